"""Judges: the opponent's response that scores the agent's completions, inside the game step.

A responder is ``respond(state, moves, facts, rng) -> dict``: it reads the sampled transcripts
(``moves``, a ``GameRecord`` of prompt + completion rows) and what playing revealed (``facts``:
the sampler's outputs and the batch's answer key, one row per completion) and returns judgments
namespaced by the seat they are about (``records.seat_key``): at least
``"agent/rewards": float32[B]`` for the seat it judges (``seat=``, the agent by default). An
optional ``"metrics"`` dict is logged by the step. ``zero_sum(judge)`` gives the other seat the
negative of the judged seat's rewards.

- ``arena_judge``: the arithmetic arena's verifiable judge (exact match and partial credit of the
  answer after the last '|'), written for one completion and vmapped; it agrees with the host-side
  ``gamejax.games.arithmetic.grade`` on every text (tested).
- ``function_judge``: any jittable user function of the transcript.
- ``host_judge``: any Python function of the decoded transcript before the agent's last move and
  of that move, called from the compiled step through ``jax.pure_callback``.
- ``responders``: several responders in one (their judgments merged);
- ``zero_sum``: a judge of one seat made a judge of both (the other seat's reward is the negative).

>>> import jax.numpy as jnp
>>> from gamejax.data.tokenizer import ByteTokenizer
>>> tok = ByteTokenizer()
>>> completion = jnp.asarray(list(tok.encode("5+7+0=12;0+0+1=01|12")) + [2, 0])
>>> exact, partial = arena_grade(completion, jnp.asarray([-1, -1, 1, 2]))
>>> bool(exact), float(partial)
(True, 1.0)
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

from gamejax.data.tokenizer import EOS, OFFSET, ByteTokenizer
from gamejax.models import reward
from gamejax.payoffs.general_preference import group_win_rates
from gamejax import records
from gamejax.records import GameRecord

ANSWER_KEY = "answer_digits"      # int32[B, W]: right-aligned digits, -1 before them
ANSWER_WIDTH = 19                 # W: digits of an answer key (arena answers fit int64)
JUDGE = "judge"                   # the frozen player holding a reward model's params
_ZERO, _NINE, _BAR = OFFSET + ord("0"), OFFSET + ord("9"), OFFSET + ord("|")

Responder = Callable[[Any, GameRecord, Mapping[str, Any], jax.Array], dict]


def arena_grade(completion_N: jax.Array, want_W: jax.Array, eos_id: int = EOS):
  """``(exact bool[], partial float32[])`` of one completion against one answer key.

  The answer is the text after the last '|' before the first ``eos_id`` (or all of it); it must be
  one or more digits, read as a number (leading zeros dropped). Partial credit is the fraction of
  the wanted digits matched right-aligned; an unreadable answer scores (False, 0). The judge reads
  token ids: a special token (PAD, BOS) inside the answer makes it unreadable, where host-side
  decoding would drop it; on byte tokens it agrees with ``arithmetic.grade`` exactly.
  """
  chex.assert_rank([completion_N, want_W], 1)
  n, w = completion_N.shape[0], want_W.shape[0]
  idx_N = jnp.arange(n)
  stop = jnp.min(jnp.where(completion_N == eos_id, idx_N, n))       # first EOS, or n
  before_N = idx_N < stop
  bar = jnp.max(jnp.where((completion_N == _BAR) & before_N, idx_N, -1))
  region_N = before_N & (idx_N > bar)
  is_digit_N = (completion_N >= _ZERO) & (completion_N <= _NINE)
  readable = jnp.any(region_N) & jnp.all(is_digit_N | ~region_N)
  digit_N = completion_N - _ZERO
  # Significant digits: from the first non-zero one (a lone 0 keeps the last digit).
  first_nz = jnp.min(jnp.where(region_N & (digit_N != 0), idx_N, stop - 1))
  significant_N = region_N & (idx_N >= first_nz)
  k_N = stop - idx_N                                  # 1 for the last answer digit
  want_len = jnp.sum(want_W >= 0)
  want_at_N = want_W[jnp.clip(w - k_N, 0, w - 1)]
  hit_N = significant_N & (k_N <= want_len) & (digit_N == want_at_N)
  matched = jnp.sum(hit_N)
  exact = readable & (jnp.sum(significant_N) == want_len) & (matched == want_len)
  partial = jnp.where(readable, matched / jnp.maximum(want_len, 1), 0.0).astype(jnp.float32)
  return exact, partial


def completions(moves: GameRecord, facts: Mapping[str, Any]) -> jax.Array:
  """``int32[B, N]``: the agent's last move (``facts["completion"]``, PAD after its stop)."""
  del moves
  if "completion" not in facts:
    raise KeyError("judges read the agent's last move from facts['completion'] (sampled_play "
                   f"provides it); got keys {sorted(facts)}")
  return facts["completion"]


def graded(moves: GameRecord, facts: Mapping[str, Any], eos_id: int = EOS,
           who: str = "arena_judge"):
  """``(exact bool[B], partial float32[B])``: each completion against its answer key
  (``arena_grade``); a ``KeyError`` naming ``who`` when the batch has no answer key."""
  if ANSWER_KEY not in facts:
    raise KeyError(f"{who} needs the answer key {ANSWER_KEY!r} in the batch (a prompt "
                   f"loader built with the arena's answers); got keys {sorted(facts)}")
  return jax.vmap(lambda c, w: arena_grade(c, w, eos_id))(completions(moves, facts),
                                                          facts[ANSWER_KEY])


def arena_judge(partial_credit: float = 0.0, eos_id: int = EOS, seat: str = "agent") -> Responder:
  """Rewards ``exact + partial_credit * partial`` per completion, from ``facts["answer_digits"]``,
  to ``seat`` (``"agent/rewards"``, ``"agent/exact"``, ``"agent/partial"``).

  Metrics: exact-match rate, mean partial credit.
  """
  key = functools.partial(records.seat_key, seat)
  if not 0.0 <= partial_credit:
    raise ValueError(f"arena_judge partial_credit must be >= 0; got {partial_credit}")

  def respond(state, moves, facts, rng):
    del state, rng
    exact_B, partial_B = graded(moves, facts, eos_id)
    exact_B = exact_B.astype(jnp.float32)
    rewards_B = exact_B + partial_credit * partial_B
    return {key("rewards"): rewards_B, key("exact"): exact_B, key("partial"): partial_B,
            "metrics": {"judge/exact": exact_B.mean(), "judge/partial": partial_B.mean()}}

  return respond


def reward_model_judge(policy_cfg, apply: Callable, name: str = JUDGE,
                       seat: str = "agent") -> Responder:
  """A learned judge: the reward model in ``state.frozen[name]`` scores each transcript at the
  agent's last token (``gamejax.models.reward``). ``apply(params, tokens, positions, segments)``
  gives per-position scores; they are ``seat``'s rewards. A reward model whose vocabulary differs from ``policy_cfg``'s is
  refused when the step is traced."""
  rewards_key = records.seat_key(seat, "rewards")

  def respond(state, moves, facts, rng):
    del facts, rng
    if name not in state.frozen:
      raise KeyError(f"reward_model_judge needs a frozen player {name!r}; the state has "
                     f"{sorted(state.frozen)}")
    params = state.frozen[name]
    vocab = reward.vocab_size(params)
    if vocab != policy_cfg.vocab_size:
      raise reward.RewardModelError(
          f"the reward model's embedding has {vocab} token ids but the policy's vocab_size is "
          f"{policy_cfg.vocab_size}: the reward model must read the policy's token ids")
    scores_BT = apply(params, moves.tokens, moves.positions, moves.segment_ids)
    rewards_B = jax.lax.stop_gradient(reward.sequence_scores(scores_BT, moves))
    return {rewards_key: rewards_B, "metrics": {"judge/reward_model_score": rewards_B.mean()}}

  return respond


def function_judge(fn: Callable[[GameRecord, Mapping[str, Any]], jax.Array],
                   seat: str = "agent") -> Responder:
  """A judge from any jittable ``fn(moves, facts) -> float32[B]``: ``seat``'s rewards."""
  rewards_key = records.seat_key(seat, "rewards")

  def respond(state, moves, facts, rng):
    del state, rng
    rewards_B = jnp.asarray(fn(moves, facts), jnp.float32)
    chex.assert_shape(rewards_B, (moves.tokens.shape[0],))
    return {rewards_key: rewards_B}

  return respond


def host_judge(fn: Callable[[str, str], float], seat: str = "agent") -> Responder:
  """A judge from a Python ``fn(prompt_text, completion_text) -> float`` run on the host: the
  reward of ``seat``.

  The completion text stops before the first EOS. Called once per step through
  ``jax.pure_callback`` (the compiled step waits for it).
  """
  tok = ByteTokenizer()
  rewards_key = records.seat_key(seat, "rewards")

  def score(tokens_BT, segments_BT, completion_BN, mask_BN):
    out = np.zeros((tokens_BT.shape[0],), np.float32)
    for b in range(tokens_BT.shape[0]):
      n = int(mask_BN[b].sum())
      transcript = tokens_BT[b][segments_BT[b] > 0]
      prompt = tok.decode(transcript[:len(transcript) - n])
      out[b] = float(fn(prompt, tok.decode_until_eos(completion_BN[b])))
    return out

  def respond(state, moves, facts, rng):
    del state, rng
    shape = jax.ShapeDtypeStruct((moves.tokens.shape[0],), jnp.float32)
    rewards_B = jax.pure_callback(
        lambda *a: score(*map(np.asarray, a)), shape, moves.tokens, moves.segment_ids,
        completions(moves, facts), facts["completion_mask"])
    return {rewards_key: rewards_B}

  return respond


Preference = Callable[[GameRecord, Mapping[str, Any], int], jax.Array]


def arena_preference(eos_id: int = EOS) -> Preference:
  """The arena's grader as a preference: ``P(y > y') = 1/2 + (exact(y) - exact(y')) / 2`` (a
  right answer beats a wrong one; two right or two wrong answers tie at 1/2)."""

  def prefer(moves, facts, group_size):
    exact_B, _ = graded(moves, facts, eos_id, "arena_preference")
    e_PG = exact_B.astype(jnp.float32).reshape(-1, group_size)
    return 0.5 + 0.5 * (e_PG[:, :, None] - e_PG[:, None, :])

  return prefer


def cyclic_equilibrium(strengths) -> np.ndarray:
  """The symmetric Nash equilibrium of the cyclic style game with edge strengths ``(a, b, c)``
  (``P(A > B) = 1/2 + a``, ``P(B > C) = 1/2 + b``, ``P(C > A) = 1/2 + c``): ``(b, c, a) / (a + b
  + c)``, the mix against which every style wins 1/2.

  >>> cyclic_equilibrium((0.1, 0.2, 0.3)).round(4).tolist()
  [0.3333, 0.5, 0.1667]
  """
  a, b, c = (float(x) for x in strengths)
  return np.asarray([b, c, a]) / (a + b + c)


def cyclic_matrix(strengths) -> np.ndarray:
  """``float64[3, 3]``: ``P(style i > style j)`` of the cyclic game (ties 1/2 on the diagonal)."""
  a, b, c = (float(x) for x in strengths)
  return 0.5 + np.asarray([[0.0, a, -c], [-a, 0.0, b], [c, -b, 0.0]])


def cyclic_preference(styles=("A", "B", "C"), strengths=(0.5, 0.5, 0.5)) -> Preference:
  """An intransitive judge of answers by their opening character: style 0 beats style 1 with
  probability ``1/2 + strengths[0]``, 1 beats 2 with ``1/2 + strengths[1]``, 2 beats 0 with
  ``1/2 + strengths[2]`` (each strength in ``(0, 1/2]``; equal styles tie at 1/2). An answer that
  opens with anything else loses to every styled answer and ties another unstyled one. No reward
  ranks the styles: the game's solution is the mixed equilibrium ``cyclic_equilibrium``."""
  styles = tuple(styles)
  tok = ByteTokenizer()
  if len(styles) != 3 or len(set(styles)) != 3 or any(
      not isinstance(x, str) or len(tok.encode(x)) != 1 for x in styles):
    raise ValueError(f"cyclic_preference.styles={styles!r}: expected 3 different one-byte texts")
  strengths = tuple(float(x) for x in strengths)
  if len(strengths) != 3 or not all(0.0 < x <= 0.5 for x in strengths):
    raise ValueError(f"cyclic_preference.strengths={strengths!r}: expected 3 strengths in (0, 1/2] "
                     "(P(winner > loser) = 1/2 + strength must be a probability in [0, 1], and a "
                     "cycle needs every edge)")
  ids = jnp.asarray([int(tok.encode(x)[0]) for x in styles])
  table = np.full((4, 4), 0.5)                      # index 3: an unstyled opening
  table[:3, :3] = cyclic_matrix(strengths)
  table[:3, 3], table[3, :3] = 1.0, 0.0
  table = jnp.asarray(table, jnp.float32)

  target_S = jnp.asarray(cyclic_equilibrium(strengths), jnp.float32)

  def style_of(moves, facts):
    """``int32[B]``: each answer's style (3: unstyled) by its opening token."""
    first_B = completions(moves, facts)[:, 0]
    return jnp.argmax(jnp.concatenate([first_B[:, None] == ids[None, :],
                                       jnp.ones_like(first_B[:, None], bool)], axis=1), axis=1)

  def prefer(moves, facts, group_size):
    s_PG = style_of(moves, facts).reshape(-1, group_size)
    return table[s_PG[:, :, None], s_PG[:, None, :]]

  def metrics(moves, facts):
    """The sampled answers' style frequencies (``style/p_<style>``, ``style/p_unstyled``) and
    their total variation from the equilibrium, unstyled mass counted in full
    (``style/distance``)."""
    style_B = style_of(moves, facts)
    freq_S = jnp.stack([(style_B == k).mean() for k in range(3)])
    out = {f"style/p_{name}": f for name, f in zip(styles, freq_S)}
    out["style/p_unstyled"] = 1.0 - freq_S.sum()
    out["style/distance"] = 0.5 * (jnp.abs(freq_S - target_S).sum() + (1.0 - freq_S.sum()))
    return out

  prefer.metrics = metrics
  return prefer


def pairwise_judge(prefer: Preference, group_size: int, seat: str = "agent") -> Responder:
  """A judge of preferences between the ``group_size`` answers to each prompt:
  ``prefer(moves, facts, group_size) -> float32[P, G, G]`` gives ``P(y_i > y_j | x)`` within each
  group. Judgments for ``seat``: ``"win_rates"`` (``mean_{j != i} P(y_i > y_j)``, SPPO's
  estimate of ``P(y_i > pi_t)``), the same as ``"rewards"`` (GRPO against the pairwise judge:
  reward = win rate in the group). Metrics: the mean win rate, the preferences' distance from a
  preference (``judge/antisymmetry``: ``max |P + P^T - 1|``, 0 for a proper judge), and those of
  ``prefer.metrics(moves, facts)`` when the preference has its own (``cyclic_preference``'s
  style frequencies)."""
  if group_size < 2:
    raise ValueError(f"pairwise_judge needs group_size >= 2 answers per prompt; got {group_size}")
  key = functools.partial(records.seat_key, seat)

  def respond(state, moves, facts, rng):
    del state, rng
    prefs_PGG = jnp.asarray(prefer(moves, facts, group_size), jnp.float32)
    chex.assert_shape(prefs_PGG, (moves.tokens.shape[0] // group_size, group_size, group_size))
    win_B = jax.vmap(group_win_rates)(prefs_PGG).reshape(-1)
    skew = jnp.abs(prefs_PGG + jnp.swapaxes(prefs_PGG, 1, 2) - 1.0).max()
    metrics = {"judge/win_rate": win_B.mean(), "judge/antisymmetry": skew,
               **preference_metrics(prefer, prefs_PGG, moves, facts)}
    return {key("win_rates"): win_B, key("rewards"): win_B, "metrics": metrics}

  respond.prefer, respond.group_size = prefer, group_size     # the run probes the preference
  return respond


def preference_metrics(prefer: Preference, prefs: jax.Array, moves: GameRecord,
                       facts: Mapping[str, Any]) -> dict:
  """What every judge of preferences logs: how many of its ``prefs`` fall outside [0, 1] (NaN
  too; summed into the run's summary), and the preference's own metrics of the answers
  (``prefer.metrics(moves, facts)``, when it has them)."""
  outside = ~((prefs >= 0.0) & (prefs <= 1.0))
  out = {"judge/preference_out_of_range": outside.sum().astype(jnp.float32)}
  if hasattr(prefer, "metrics"):
    out.update(prefer.metrics(moves, facts))
  return out


def check_preference(prefer: Preference, group_size: int, width: int = 12, seed: int = 0) -> None:
  """A ``ValueError`` when ``prefer`` gives values outside [0, 1] (or not finite) on a probe batch
  of random answers to two prompts: a preference is a probability. (Values that only some
  answers bring out are counted in the step instead: ``judge/preference_out_of_range``.)"""
  rng = np.random.default_rng(seed)
  rows = 2 * group_size
  key = rng.integers(0, 10, size=(rows, 3))
  # Prompt 0: three-digit answers, every other one right; prompt 1: answers opening with any
  # printable character (a style), then digits.
  answer = np.where((np.arange(rows) % 2 == 0)[:, None], key, (key + 1) % 10)
  completion = np.concatenate([_ZERO + answer, np.full((rows, width - 3), EOS)], axis=1)
  completion[group_size:, 0] = rng.integers(OFFSET + 32, OFFSET + 127, size=rows - group_size)
  facts = {"completion": jnp.asarray(completion, jnp.int32),
           "completion_mask": jnp.ones(completion.shape, jnp.float32),
           ANSWER_KEY: jnp.asarray(np.concatenate([np.full((rows, ANSWER_WIDTH - 3), -1), key],
                                                  axis=1), jnp.int32)}
  ones = jnp.ones(completion.shape, jnp.int32)
  moves = GameRecord(jnp.asarray(completion, jnp.int32), ones, ones, ones)
  values = np.asarray(prefer(moves, facts, group_size), np.float64)
  if not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
    raise ValueError(f"pairwise_judge.prefer={getattr(prefer, '__qualname__', prefer)}: a "
                     f"preference P(y > y') is a probability in [0, 1]; on a probe batch it gave "
                     f"values from {np.nanmin(values):.4g} to {np.nanmax(values):.4g}"
                     + ("" if np.isfinite(values).all() else " and non-finite ones"))


def responders(*parts: Responder) -> Responder:
  """One responder running ``parts`` in order; later judgments (and metrics) override earlier."""

  def respond(state, moves, facts, rng):
    out, metrics = {}, {}
    for i, part in enumerate(parts):
      got = dict(part(state, moves, facts, jax.random.fold_in(rng, i)))
      metrics.update(got.pop("metrics", {}))
      out.update(got)
    if metrics:
      out["metrics"] = metrics
    return out

  return respond


def zero_sum(judge: Responder, seat: str = "agent") -> Responder:
  """``judge`` of ``seat``, plus the other seat's rewards: the negative of ``seat``'s (a zero-sum
  game: what one seat wins the other loses).

  >>> both = zero_sum(function_judge(lambda moves, facts: jnp.array([1.0, -0.5])))
  >>> moves = GameRecord(*(jnp.ones((2, 3), jnp.int32),) * 4)
  >>> {k: v.tolist() for k, v in both(None, moves, {}, None).items()}
  {'agent/rewards': [1.0, -0.5], 'opponent/rewards': [-1.0, 0.5]}
  """
  mine, theirs = (records.seat_key(s, "rewards") for s in (seat, records.OTHER_SEAT[seat]))

  def respond(state, moves, facts, rng):
    out = dict(judge(state, moves, facts, rng))
    if mine not in out:
      raise KeyError(f"zero_sum: the judge returned no {mine!r}; got {sorted(out)}")
    out[theirs] = -out[mine]
    return out

  return respond
