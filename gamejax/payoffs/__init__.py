"""Payoff functions: every training objective in gamejax is one."""
from gamejax.payoffs.base import Payoff, Play
from gamejax.payoffs.combine import scaled, weighted
from gamejax.payoffs.imitation import imitation, token_log_likelihood
from gamejax.payoffs.preference import (dpo, dpo_pair_loss, ipo, ipo_pair_loss,
                                        sequence_logprobs)

__all__ = [
    "Payoff", "Play", "dpo", "dpo_pair_loss", "imitation", "ipo", "ipo_pair_loss", "scaled",
    "sequence_logprobs", "token_log_likelihood", "weighted",
]
