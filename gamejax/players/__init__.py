"""Players that are not learners: the sampled policy's moves, judges, opponents, frozen
references, and followers of a learner (self-play opponents, MMD's magnet: ``selfplay``)."""
