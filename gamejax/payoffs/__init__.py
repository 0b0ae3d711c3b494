"""Payoff functions: every training objective in gamejax is one."""
from gamejax.payoffs.base import Payoff, Play
from gamejax.payoffs.combine import scaled, weighted
from gamejax.payoffs.imitation import imitation, token_log_likelihood

__all__ = ["Payoff", "Play", "imitation", "scaled", "token_log_likelihood", "weighted"]
