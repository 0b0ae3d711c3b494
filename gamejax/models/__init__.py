"""Models that enter the game step as pure ``apply(params, tokens, positions, segment_ids)``."""
