"""The agent plays: its moves are sampled from its current params inside the game step.

``sampled_play(...)`` is a game's ``play`` function: given a batch of prompts (the opponent's
opening moves, left-padded, see ``gamejax.data.prompts``) it samples ``group_size`` completions of
each prompt with the KV-cached sampler and returns the moves as one ``GameRecord`` (prompt tokens
attributed to the opponent, completion tokens to the agent) plus the facts of playing, one row per
completion in group-major order (the ``G`` completions of prompt ``g`` are rows ``g*G .. g*G+G-1``):

- ``behaviour_logprobs``: float32[B, T], the sampling policy's log-prob of each agent token, at
  the position that predicts it: of ``logits / temperature`` (the default,
  ``scaled_logprobs=True``) or of the temperature-1 logits; unfiltered by top-k/top-p either way
  (see ``sampling.generate``);
- ``completion_mask``: float32[B, N]; ``stopped``: bool[B] (False: the row hit the length limit);
- every other batch field (e.g. the judge's answer key) repeated ``group_size`` times;
- ``metrics``: the number of completions that hit the length limit without a stop token (they
  are judged as they are, and counted in the run's summary), the mean completion length.

Scoring at the sampler's temperature (the convention of TRL and verl): with ``scaled_logprobs``
the behaviour log-probs are those of ``softmax(logits / temperature)``, and the learner's and the
reference's log-probs must be computed from ``logits / temperature`` too (``at_temperature``
wraps an ``apply``; the run does both from ``Rollout.score_at_temperature``). Then the importance
ratio of the first update is 1 on every sampled token, and KL estimates refer to the policy that
sampled. With ``scaled_logprobs=False`` everything is scored at temperature 1 (gamejax 0.1's
behaviour): the moves come from another distribution than the one the payoff scores.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from gamejax import records, sampling, step as game_step
from gamejax.data.tokenizer import EOS
from gamejax.models import lm, logprobs

PROMPT_KEYS = ("prompt", "prompt_lengths")
# Optional in a prompt batch: float32[B, L], the log-prob of each prompt token under the player
# who wrote it (an opponent that sampled its move), at the token's own slot; the play's
# ``behaviour_logprobs`` then cover the prompt's tokens too.
PROMPT_LOGPROBS = "prompt_logprobs"


Opponent = Callable[[jax.Array, Mapping[str, Any], jax.Array], tuple[jax.Array, jax.Array]]


def at_temperature(apply: Callable[..., Any], temperature: float) -> Callable[..., Any]:
  """``apply`` with its logits divided by ``temperature`` (an actor-critic's values untouched).

  Temperature 0 (greedy) and 1 leave ``apply`` as it is.

  >>> apply = lambda params, tokens, positions, segment_ids: (params * 1.0, params * 0.0)
  >>> [float(x) for x in at_temperature(apply, 2.0)(jnp.array(3.0), None, None, None)]
  [1.5, 0.0]
  """
  if temperature in (0.0, 1.0):
    return apply

  def scaled(params, tokens, positions, segment_ids, **options):
    if "targets" in options:        # token log-probs read block by block (models.logprobs)
      return apply(params, tokens, positions, segment_ids,
                   **logprobs.then(options, lambda logits, _: logits / temperature))
    out = apply(params, tokens, positions, segment_ids, **options)
    if isinstance(out, tuple):      # (logits, values): an actor-critic
      return (out[0] / temperature,) + tuple(out[1:])
    return out / temperature

  return logprobs.same_protocol(scaled, apply)


def sampled_play(cfg: lm.Config, group_size: int, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 eos_id: int = EOS, stop_ids: Sequence[int] = (), player: str = "agent",
                 turns: int = 1, opponent: Opponent | None = None,
                 params_of: Callable[[Any], Any] = lambda params: params,
                 scaled_logprobs: bool = True, share_prompt: bool = False,
                 cache_block: int = sampling.DECODE_CACHE_BLOCK):
  """``play(state, batch, rng) -> (moves, facts)`` sampling ``player``'s params: a learner's or
  a frozen player's (SPIN's previous iterate; ``step.player_params``).

  With ``turns > 1`` the game goes on after the agent's move: ``opponent(completion_BN, facts,
  rng) -> (reply_BR, reply_mask_BR)`` answers it (e.g. ``opponents.arena_feedback``), and the agent
  moves again on the whole transcript so far, ``turns`` agent moves in all. The record holds every
  move, each token attributed to the player who made it (left-padded, contiguous); ``facts``
  describe the last agent move (``completion``, ``completion_mask``, ``stopped``), which is what
  judges read. A batch may carry ``PROMPT_LOGPROBS`` (the prompt writer's log-probs of its
  tokens): they go into ``behaviour_logprobs`` at the prompt's tokens. ``params_of`` picks the
  policy out of the player's params (e.g. an actor-critic's).
  ``scaled_logprobs``: behaviour log-probs of ``logits / temperature`` (score the learner with
  ``at_temperature(apply, temperature)`` then), else of the temperature-1 logits.
  ``share_prompt`` (with ``group_size > 1``): the record says that each group's rows open with the
  same prompt (``records.SharedPrompt``), and the forwards over it (the learner's, the
  reference's) compute that prompt once per group (``gamejax.models.shared_prompt``): the same
  logits up to float rounding, ``G`` times fewer prompt tokens.
  The record's ``opening`` is the prompts' width (no move of the play lies before it), so that the
  RL payoffs' and the reference's log-probs, read in blocks (``logits_chunk``), skip the prompts;
  0 with ``PROMPT_LOGPROBS`` (the prompts were sampled too).
  ``cache_block``: the sampler's decode loop in runs attending the cache filled so far
  (``sampling.generate``).
  """
  if group_size < 1:
    raise ValueError(f"sampled_play group_size must be >= 1; got {group_size}")
  if turns < 1 or (turns > 1 and opponent is None):
    raise ValueError(f"sampled_play needs turns >= 1, and an opponent when turns > 1; got "
                     f"turns={turns}, opponent={opponent}")
  stop_ids = tuple(int(s) for s in stop_ids)

  def play(state, batch, rng):
    missing = [k for k in PROMPT_KEYS if k not in batch]
    if missing:
      raise KeyError(f"sampled_play needs prompt batches with {PROMPT_KEYS}; missing {missing}")
    repeat = lambda x: jnp.repeat(jnp.asarray(x), group_size, axis=0)
    tokens_BL, lengths_B = repeat(batch["prompt"]), repeat(batch["prompt_lengths"])
    b, length = tokens_BL.shape
    real_BL = jnp.arange(length)[None, :] >= (length - lengths_B)[:, None]
    players_BL = jnp.where(real_BL, records.OPPONENT, records.NOBODY).astype(jnp.int32)
    logprobs_BL = (repeat(batch[PROMPT_LOGPROBS]).astype(jnp.float32) if PROMPT_LOGPROBS in batch
                   else jnp.zeros((b, length), jnp.float32))   # the sampler's, at each slot
    facts = {k: repeat(v) for k, v in batch.items() if k not in PROMPT_KEYS + (PROMPT_LOGPROBS,)}
    params = jax.lax.stop_gradient(params_of(game_step.player_params(state, player)))
    no_stop, moved = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    for turn in range(turns):
      k_sample, k_reply = jax.random.split(jax.random.fold_in(rng, turn))
      # The first move continues each prompt group_size times: one prefill per prompt.
      if turn == 0:
        prompts, prompt_lengths, group = batch["prompt"], batch["prompt_lengths"], group_size
      else:
        prompts, prompt_lengths, group = tokens_BL, lengths_B, 1
      out = sampling.generate(cfg, params, jnp.asarray(prompts, jnp.int32), prompt_lengths,
                              max_new_tokens, k_sample, temperature, eos_id, top_k=top_k,
                              top_p=top_p, stop_ids=stop_ids, scaled_logprobs=scaled_logprobs,
                              group_size=group, cache_block=cache_block)
      mask_BN = out["mask_BN"]
      facts.update(completion=out["tokens"], completion_mask=mask_BN, stopped=out["stopped_B"])
      no_stop = no_stop + (~out["stopped_B"]).sum()
      moved = moved + mask_BN.sum()
      parts = [(tokens_BL, players_BL, logprobs_BL, real_BL),
               (out["tokens"], jnp.where(mask_BN > 0, records.AGENT, records.NOBODY),
                out["logprobs"] * mask_BN, mask_BN > 0)]
      if turn + 1 < turns:
        reply_BR, reply_mask_BR = opponent(out["tokens"], facts, k_reply)
        parts.append((reply_BR, jnp.where(reply_mask_BR > 0, records.OPPONENT, records.NOBODY),
                      jnp.zeros(reply_BR.shape, jnp.float32), reply_mask_BR > 0))
      tokens_BL, players_BL, logprobs_BL, real_BL = right_align(
          *(jnp.concatenate([jnp.asarray(p[i]) for p in parts], axis=1) for i in range(4)))
      lengths_B = real_BL.sum(axis=1).astype(jnp.int32)
    t = tokens_BL.shape[1]
    positions_BL = jnp.where(real_BL, jnp.arange(t)[None, :] - (t - lengths_B)[:, None], 0)
    shared = None
    if share_prompt and group_size > 1:
      shared = records.SharedPrompt(repeat(batch["prompt_lengths"]).astype(jnp.int32),
                                    group_size=group_size, width=jnp.shape(batch["prompt"])[1])
    # Every move of the play lies after the prompts' width (the rows are right-aligned and each
    # holds at most the width's prompt tokens): the record opens with data there, unless the
    # prompts were themselves sampled (PROMPT_LOGPROBS: a prompt writer's moves, read by its RL).
    opening = 0 if PROMPT_LOGPROBS in batch else jnp.shape(batch["prompt"])[1]
    moves = records.GameRecord(tokens=tokens_BL.astype(jnp.int32),
                               positions=positions_BL.astype(jnp.int32),
                               segment_ids=real_BL.astype(jnp.int32), players=players_BL,
                               shared_prompt=shared, opening=opening)
    behaviour_BL = jnp.concatenate([logprobs_BL[:, 1:], jnp.zeros((b, 1), jnp.float32)], axis=1)
    facts.update({
        "behaviour_logprobs": behaviour_BL,
        "metrics": {"play/no_stop": no_stop.astype(jnp.float32),
                    "play/completion_tokens": moved,
                    "play/completion_length": moved / (b * turns)}})
    return moves, facts

  return play


def right_align(tokens_BT, players_BT, values_BT, real_BT):
  """Moves each row's real tokens (``real_BT``) to the end of the row, in order, and returns the
  four arrays re-laid out (padding: 0, NOBODY, 0, False) -- a left-padded transcript.

  >>> right_align(*map(jnp.asarray, ([[5, 0, 6, 0]], [[2, 0, 1, 0]], [[0., 0., .5, 0.]],
  ...                                [[True, False, True, False]])))[0].tolist()
  [[0, 0, 5, 6]]
  """
  b, t = tokens_BT.shape
  after_BT = jnp.cumsum(real_BT[:, ::-1].astype(jnp.int32), axis=1)[:, ::-1]
  dest_BT = jnp.where(real_BT, t - after_BT, t)          # t: dropped
  rows_B1 = jnp.arange(b)[:, None]
  move = lambda x: jnp.zeros_like(x).at[rows_B1, dest_BT].set(x, mode="drop")
  return move(tokens_BT), move(players_BT), move(values_BT), move(real_BT)
