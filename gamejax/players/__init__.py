"""Players that are not learners: the sampled policy's moves, judges, frozen references."""
