"""The one compiled game step: play -> respond -> payoff -> gradient -> update, for every learner.

``step(state, batches) -> (state, metrics)`` runs K game steps per host call with ``lax.scan``
(``batches`` carry a leading K axis) and is jitted once, with explicit shardings over the mesh and
the state donated. Nothing here names an algorithm: pre-training, SFT, RLHF and self-play differ
only in the ``Game``'s ``play``/``respond`` functions and in each learner's payoff.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gamejax import sharding
from gamejax.models import fusion, logprobs, partitioning
from gamejax.payoffs.base import Payoff, Play
from gamejax.records import GameRecord


@flax.struct.dataclass
class GameState:
  params: dict            # learning players' params, by player name
  opt_state: dict         # their optimizer states
  frozen: dict            # players that do not learn (a reference, a judge, a lagged copy), by name
  rng: jax.Array
  step: jax.Array


def player_params(state: GameState, name: str):
  """The params of player ``name``: a learner's (``state.params``) or a frozen player's.

  A seat is sat by a player: ``play`` samples a seat's moves from ``player_params(state, who)``,
  so one learner may sit in both seats (self-play) or face a frozen copy of itself.
  """
  if hasattr(name, "resolve"):          # a seat sat by a mix of players (selfplay.Mixture)
    return name.resolve(lambda part: player_params(state, part))
  if name in state.params:
    return with_frozen(state.params[name], state.frozen)
  if name in state.frozen:
    return state.frozen[name]
  raise KeyError(f"no player {name!r}: the learners are {sorted(state.params)}, the frozen "
                 f"players {sorted(state.frozen)}")


def with_frozen(params, frozen, low_rank: bool = False):
  """A learner's params as its model reads them: LoRA adapters (``gamejax.models.lora``) joined
  with their base, a frozen player (``low_rank``: as ``kernels.LowRank`` weights, the deltas not
  added); any other params as they are."""
  if hasattr(params, "with_frozen"):
    return params.with_frozen(frozen, low_rank=low_rank)
  return params


def bind_frozen(apply: Callable[..., jax.Array], frozen) -> Callable[..., jax.Array]:
  """``apply`` of params that may need the frozen players (LoRA adapters on a frozen base): the
  frozen params are the step's traced state, never constants of the compiled step. This is the
  apply a payoff differentiates, so LoRA's weights come low-rank: its backward forms no gradient
  of a frozen weight (sampling reads the adapted weights formed once, ``player_params``)."""
  return logprobs.same_protocol(
      lambda params, *inputs, **options: apply(with_frozen(params, frozen, low_rank=True),
                                               *inputs, **options),
      apply)


@dataclasses.dataclass(frozen=True)
class Learner:
  """A learning player: its pure model ``apply``, its payoff and its optimizer.

  ``prepare(params, play) -> judgments`` (optional) runs once per step with the pre-update params,
  before any update, and adds constants to the judgments (PPO's advantages from the critic). The
  step then makes ``epochs`` passes over the moves, each in ``minibatches`` updates on a random
  partition of the rows (PPO's minibatch epochs); the default is one update on all rows.

  ``accumulate > 1``: each update's rows are split into that many microbatches whose gradients
  are computed one after another (``lax.scan``: one microbatch's activations are live at a time)
  and averaged into ONE optimizer update. The payoff is evaluated per microbatch, so the update is
  the full-batch one exactly when the payoff is a mean over rows of equal weight per microbatch;
  a token-mean payoff (``imitation``) is averaged per microbatch, which weighs a microbatch's
  tokens by ``1 / (its tokens)`` instead of ``1 / (all tokens)``. Microbatches are contiguous
  blocks of rows (a group of consecutive completions of one prompt stays whole when the rows per
  microbatch are a multiple of it); ``halves``: the rows are a preference batch (chosen rows,
  then rejected rows: pair ``i`` is rows ``i`` and ``P + i``) and microbatch ``j`` takes block
  ``j`` of each half, so pairs stay together.
  """
  apply: Callable[..., jax.Array]
  payoff: Payoff
  optimizer: optax.GradientTransformation
  prepare: Callable[[Any, Play], Mapping[str, Any]] | None = None
  epochs: int = 1
  minibatches: int = 1
  accumulate: int = 1
  # The model's weights stored fused (``lm.fused_storage``): the gradient's global norm (the
  # ``grad_norm`` metric, the non-finite check) is summed over the standard layout
  # (``fusion.global_norm``), as the optimizer's clipping sums it.
  fused: tuple = ()
  halves: bool = False

  def __post_init__(self):
    if self.epochs < 1 or self.minibatches < 1 or self.accumulate < 1:
      raise ValueError(f"Learner epochs={self.epochs}, minibatches={self.minibatches} and "
                       f"accumulate={self.accumulate} must be >= 1")


def records_play(state: GameState, batch: Any, rng: jax.Array) -> tuple[GameRecord, dict]:
  """The moves are the game records themselves (pre-training, SFT, offline preference games)."""
  del state, rng
  record = batch if isinstance(batch, GameRecord) else GameRecord(**batch)
  return record, {"metrics": {"play/tokens": (record.segment_ids > 0).sum()}}


def no_response(state: GameState, moves: GameRecord, facts: Mapping[str, Any],
                rng: jax.Array) -> dict:
  """The opponent is a data source: it does not judge."""
  del state, moves, facts, rng
  return {}


UPDATES = ("simultaneous", "alternating")
PlayFn = Callable[[GameState, Any, jax.Array], tuple[GameRecord, dict]]
RespondFn = Callable[[GameState, GameRecord, Mapping[str, Any], jax.Array], dict]


@dataclasses.dataclass(frozen=True)
class Game:
  """Who learns, how moves are made and how the opponent responds.

  ``play(state, batch, rng) -> (moves, facts)`` makes the moves (reads records, samples the
  agent: ``gamejax.players.policy.sampled_play``, or samples every seat of a game from the player
  sitting in it, ``player_params``: ``gamejax.games.matrix``); ``respond(state, moves, facts, rng) ->
  judgments`` is the opponent's answer (a judge, a reference's log-probs:
  ``gamejax.players``). Each learner's payoff sees ``facts`` and the judgments merged; a
  ``"metrics"`` entry of either is logged instead.
  """
  learners: Mapping[str, Learner]
  play: PlayFn = records_play
  respond: RespondFn = no_response
  # ``after(old_state, new_state, judgments) -> new_state``, run once the learners have updated:
  # it keeps the frozen players that follow a learner (a lagged copy, an EMA, a league of
  # snapshots) and statistics of the play (role baselines; ``gamejax.players.selfplay``).
  after: Callable[[GameState, GameState, Mapping[str, Any]], GameState] | None = None
  # "simultaneous": every learner updates every step on the same play; "alternating": one learner
  # per step, in name order (step t updates learner t mod n; the others keep their params and
  # optimizer state).
  updates: str = "simultaneous"

  def __post_init__(self):
    if self.updates not in UPDATES:
      raise ValueError(f"Game.updates={self.updates!r}; expected one of {UPDATES}")


def init_state(game: Game, params: Mapping[str, Any], rng: jax.Array,
               frozen: Mapping[str, Any] | None = None) -> GameState:
  opt_state = {name: game.learners[name].optimizer.init(params[name]) for name in game.learners}
  return GameState(params=dict(params), opt_state=opt_state, frozen=dict(frozen or {}),
                   rng=rng, step=jnp.zeros((), jnp.int32))


def game_step(game: Game, state: GameState, batch: Any) -> tuple[GameState, dict]:
  """One game step (not jitted; ``make_step`` scans and compiles it)."""
  rng = jax.random.fold_in(state.rng, state.step)
  k_play, k_respond, k_payoff = jax.random.split(rng, 3)
  moves, facts = game.play(state, batch, k_play)
  facts = dict(facts)
  metrics = dict(facts.pop("metrics", {}))
  judgments = dict(game.respond(state, moves, facts, k_respond))
  metrics.update(judgments.pop("metrics", {}))
  judgments = {**facts, **judgments}
  params, opt_state = dict(state.params), dict(state.opt_state)
  total_loss = 0.0
  learners = sorted(game.learners.items())
  frozen = jax.lax.stop_gradient(state.frozen)
  for i, (name, learner) in enumerate(learners):
    play = Play(bind_frozen(learner.apply, frozen), moves, judgments,
                jax.random.fold_in(k_payoff, i), frozen)
    new_params, new_opt, m = learner_updates(learner, params[name], opt_state[name], play)
    if game.updates == "alternating" and len(learners) > 1:
      mine = (state.step % len(learners)) == i
      new_params = _select(mine, new_params, params[name])
      new_opt = _select(mine, new_opt, opt_state[name])
    params[name], opt_state[name] = new_params, new_opt
    metrics.update({f"{name}/{k}": v for k, v in m.items()})
    total_loss = total_loss + m["loss"]
  metrics["loss"] = total_loss
  new_state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
  if game.after is not None:
    new_state = game.after(state, new_state, judgments)
  return new_state, metrics


def update(learner: Learner, params, opt_state, play: Play):
  """One optimizer update on ``play``: ``(params, opt_state, metrics)``.

  A non-finite payoff or gradient never reaches the parameters: the update is skipped and counted
  (a gradient whose norm overflows float32 is skipped too; with ``learner.accumulate``, a
  non-finite value in any microbatch skips the whole update).
  """
  (loss, m), grads = loss_and_grads(learner, params, play)
  grad_norm = fusion.global_norm(grads, learner.fused)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)   # a NaN/inf anywhere makes the norm so
  # A conditional, not a select between the new state and the old: a select reads the old
  # optimizer moments twice (to update them, then to keep them), and XLA then copies every moment
  # every step rather than update the donated buffers in place.
  # An optimizer that takes extra arguments is given the norm (``fusion.clip_by_global_norm``
  # uses it rather than read the gradients again).
  extra = ({"grad_norm": grad_norm}
           if isinstance(learner.optimizer, optax.GradientTransformationExtraArgs) else {})

  def apply(operands):
    params, opt_state = operands
    updates, new_opt = learner.optimizer.update(grads, opt_state, params, **extra)
    return optax.apply_updates(params, updates), new_opt

  new_params, new_opt = jax.lax.cond(finite, apply, lambda operands: operands, (params, opt_state))
  metrics = {**m, "loss": loss, "grad_norm": grad_norm,
             "skipped_nonfinite": 1.0 - finite.astype(jnp.float32)}
  return new_params, new_opt, metrics


# Metrics (by the last part of their name) that count something over the rows: with gradient
# accumulation they are summed over the microbatches, which partition the rows; every other metric
# is averaged over them.
COUNT_METRICS = ("tokens", "nonfinite_rewards")


def loss_and_grads(learner: Learner, params, play: Play):
  """``((loss, metrics), grads)`` of ``-payoff`` on ``play``: in one pass, or accumulated over
  ``learner.accumulate`` microbatches (the mean of their gradients, losses and metrics; counts,
  ``COUNT_METRICS``, summed). Gradients accumulate in float32 (at least) and come back in the
  params' dtypes."""
  def loss_fn(p, play):
    value, m = learner.payoff(p, play)
    return -value, m

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  n = learner.accumulate
  if n == 1:
    return grad_fn(params, play)
  rows = play.moves.tokens.shape[0]
  order = microbatch_rows(rows, n, learner.halves)                  # [n, rows // n]
  share = play.moves.shared_prompt
  whole_groups = share is not None and not learner.halves and (rows // n) % share.group_size == 0

  def one(total, xs):
    j, idx = xs
    sub = play._replace(moves=take_moves(play.moves, idx, rows, whole_groups),
                        judgments=_take_rows(play.judgments, idx, rows),
                        rng=jax.random.fold_in(play.rng, j))
    (loss, m), grads = grad_fn(params, sub)
    total = jax.tree.map(lambda t, g: t + g.astype(t.dtype), total, grads)
    return total, (loss, m)

  zeros = jax.tree.map(
      lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.result_type(p), jnp.float32)),
      params)
  total, (losses, ms) = jax.lax.scan(one, zeros, (jnp.arange(n), jnp.asarray(order)))
  grads = jax.tree.map(lambda t, p: (t / n).astype(jnp.result_type(p)), total, params)
  metrics = {k: v.sum(0) if k.rsplit("/", 1)[-1] in COUNT_METRICS else v.mean(0)
             for k, v in ms.items()}
  return (losses.mean(), metrics), grads


def microbatch_rows(rows: int, n: int, halves: bool = False) -> np.ndarray:
  """``int32[n, rows // n]``: the rows of each of ``n`` microbatches, contiguous blocks; with
  ``halves`` (a preference batch: chosen rows, then rejected rows) block ``j`` of each half.

  >>> microbatch_rows(4, 2).tolist(), microbatch_rows(8, 2, halves=True).tolist()
  ([[0, 1], [2, 3]], [[0, 1, 4, 5], [2, 3, 6, 7]])
  """
  unit = 2 * n if halves else n
  if rows % unit:
    what = (f"2 x accumulate = {unit} (blocks of each half of a preference batch)" if halves
            else f"accumulate={n}")
    raise ValueError(f"{rows} rows of moves do not split into microbatches: not a multiple of "
                     f"{what}")
  idx = np.arange(rows, dtype=np.int32)
  if halves:
    return idx.reshape(2, n, rows // unit).transpose(1, 0, 2).reshape(n, rows // n)
  return idx.reshape(n, rows // n)


def learner_updates(learner: Learner, params, opt_state, play: Play):
  """``prepare``, then ``epochs`` x ``minibatches`` updates (metrics averaged over them), each
  accumulated over ``accumulate`` microbatches of its rows (``loss_and_grads``)."""
  if learner.prepare is not None:
    prepared = jax.lax.stop_gradient(dict(learner.prepare(params, play)))
    play = play._replace(judgments={**play.judgments, **prepared})
  if learner.epochs == 1 and learner.minibatches == 1:
    return update(learner, params, opt_state, play)
  rows = play.moves.tokens.shape[0]
  m = learner.minibatches
  if rows % m:
    raise ValueError(f"{rows} rows of moves do not split into minibatches={m}")

  def one_update(carry, idx):
    params, opt_state, key = carry
    sub = play._replace(moves=take_moves(play.moves, idx, rows, whole_groups=False),
                        judgments=_take_rows(play.judgments, idx, rows),
                        rng=jax.random.fold_in(play.rng, key))
    params, opt_state, metrics = update(learner, params, opt_state, sub)
    return (params, opt_state, key + 1), metrics

  keys = jax.random.split(jax.random.fold_in(play.rng, 1), learner.epochs)
  order = jax.vmap(lambda k: jax.random.permutation(k, rows))(keys)     # [epochs, rows]
  batches = order.reshape(learner.epochs * m, rows // m)
  (params, opt_state, _), metrics = jax.lax.scan(
      one_update, (params, opt_state, jnp.zeros((), jnp.int32)), batches)
  metrics = {k: v.sum() if k == "skipped_nonfinite" else v.mean() for k, v in metrics.items()}
  return params, opt_state, metrics


def take_moves(moves: GameRecord, idx, rows: int, whole_groups: bool) -> GameRecord:
  """Rows ``idx`` of ``moves``; what the rows share (``shared_prompt``: each group's prompt
  computed once) is kept only when ``whole_groups`` (the rows taken are whole groups, in order: a
  microbatch of contiguous rows that groups divide), else dropped, and the forward over them runs
  over every row (a random minibatch splits the groups)."""
  if moves.shared_prompt is not None and not whole_groups:
    moves = moves.replace(shared_prompt=None)
  return _take_rows(moves, idx, rows)


def _take_rows(tree, idx, rows: int):
  """Rows ``idx`` of every array in ``tree`` whose leading axis is the batch's ``rows``."""
  def take(x):
    x = jnp.asarray(x)
    return jnp.take(x, idx, axis=0) if x.ndim and x.shape[0] == rows else x
  return jax.tree.map(take, tree)


def _select(pred, on_true, on_false):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def scan_steps(game: Game, state: GameState, batches: Any) -> tuple[GameState, dict]:
  """K game steps; ``batches`` has a leading K axis; metrics come back stacked ``[K]``."""
  return jax.lax.scan(lambda s, b: game_step(game, s, b), state, batches)


def game_state_shardings(mesh: jax.sharding.Mesh, abstract_state: GameState,
                         rules=sharding.RULES) -> GameState:
  """Shardings of the state: params and frozen players by their logical axes (``sharding``), each
  learner's optimizer state as the params it mirrors; the key and counter replicated."""
  shard = lambda tree: sharding.state_shardings(mesh, tree, rules=rules)
  rep = sharding.replicated(mesh)
  opt_state = {name: sharding.state_shardings(mesh, opt, abstract_state.params.get(name), rules)
               for name, opt in abstract_state.opt_state.items()}
  return GameState(params=shard(abstract_state.params), opt_state=opt_state,
                   frozen=shard(abstract_state.frozen), rng=rep, step=rep)


def make_step(game: Game, mesh: jax.sharding.Mesh, abstract_state: GameState,
              on_trace: Callable[[], None] | None = None, rules=sharding.RULES):
  """The compiled ``step(state, batches) -> (state, metrics)`` with explicit shardings.

  The state is sharded by ``game_state_shardings``, the batches' rows over ``data`` and ``fsdp``;
  the models are traced under ``rules`` (``gamejax.models.partitioning``), so their activation
  constraints apply. ``on_trace`` is called each time the step is traced (tests count
  compilations with it).
  """
  state_sharding = game_state_shardings(mesh, abstract_state, rules)
  batch_sharding = sharding.batch_sharding(mesh, leading=1)

  def step(state, batches):
    if on_trace is not None:
      on_trace()
    with partitioning.rules(mesh, rules):
      return scan_steps(game, state, batches)

  jitted = jax.jit(step, in_shardings=(state_sharding, batch_sharding),
                   out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
  return jitted, state_sharding
