"""Payoff functions: every training objective in gamejax is one."""
from gamejax.payoffs.base import Payoff, Play
from gamejax.payoffs.combine import scaled, weighted
from gamejax.payoffs.general_preference import group_win_rates, sppo, sppo_loss
from gamejax.payoffs.imitation import imitation, token_log_likelihood
from gamejax.payoffs.kl import kl_estimate, kl_to_reference
from gamejax.payoffs.mmd import mmd
from gamejax.payoffs.policy_gradient import (grpo, grpo_advantages, reinforce, rloo,
                                             rloo_advantages)
from gamejax.payoffs.probes import first_move_probe
from gamejax.payoffs.ppo import gae, ppo, ppo_advantages, ppo_prepare, token_rewards
from gamejax.payoffs.preference import (bradley_terry, bradley_terry_pair_loss, dpo,
                                        dpo_pair_loss, ipo, ipo_pair_loss, sequence_logprobs)

__all__ = [
    "Payoff", "Play", "bradley_terry", "bradley_terry_pair_loss", "dpo", "dpo_pair_loss",
    "first_move_probe", "gae",
    "grpo", "grpo_advantages", "group_win_rates", "imitation", "ipo", "ipo_pair_loss", "kl_estimate",
    "kl_to_reference", "mmd", "ppo", "ppo_advantages", "ppo_prepare", "reinforce", "rloo",
    "rloo_advantages", "scaled", "sequence_logprobs", "sppo", "sppo_loss", "token_log_likelihood", "token_rewards",
    "weighted",
]
