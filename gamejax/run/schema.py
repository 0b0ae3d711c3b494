"""The experiment schema: what a run is, as plain data, and the checks that it can run.

An ``Experiment`` (built by gin at the edge, or in Python) is a model config, stages and an optional
held-out evaluation. A ``Stage`` is one game played for some steps. It declares its players:

- a single learner (the agent) is written inline, as short as ever:
  ``Stage(name="sft", data=..., payoff=imitation(("agent",)), steps=...)``;
- several learners go in ``learners={"red": Player(payoff=...), "blue": Player(payoff=...)}``, each
  with its own model, payoff, optimizer, ``init_from`` and ``prepare``/epochs;
- a game of its own (``game=matrix_game(...)``) seats players in its seats:
  ``seats={"agent": "red", "opponent": "blue"}``; a learner may sit in both (self-play), or face a
  frozen follower of itself (``seats={"opponent": lagged("agent", every=10)}``; ``followers`` holds
  more, e.g. MMD's magnet). Without ``game`` the opponent's seat is the data (records or prompts)
  and the judge.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from gamejax import interop, records, sampling, sharding
from gamejax.data import sources
from gamejax.data import tokenizer as tokenizers
from gamejax.games.base import GameConfigError, Scripted
from gamejax.models import families, fusion, lm, lora as lora_lib
from gamejax.payoffs.base import Payoff
from gamejax.players import judges, selfplay, verifiers
from gamejax.run import registry

class ExperimentError(ValueError):
  """An experiment description that cannot run (bad sizes, names, combinations)."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """A registered data source (``sources.load_source``) and its build parameters."""
  name: str
  params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  too_long: str = "truncate"     # a record longer than seq_len: "truncate", "skip" or "error"

  def load(self, split: str, data_dir: str):
    return sources.load_source(self.name, split, data_dir, **dict(self.params))


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """AdamW with warmup + cosine decay and global-norm clipping."""
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  end_factor: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.98
  grad_clip: float = 1.0
  # Adam's epsilon. Near a game's equilibrium the gradients shrink towards 0 and Adam's
  # normalised step does not: a larger eps lets the steps shrink with them.
  eps: float = 1e-8
  # The dtype of the optimizer's state and arithmetic (None: the params'). 'float32' with
  # bfloat16 params (``param_dtype='bfloat16'``) keeps Adam's moments in float32.
  state_dtype: str | None = None

  def build(self, total_steps: int, fused: tuple = ()) -> optax.GradientTransformation:
    """The optimizer of ``total_steps`` updates; ``fused``: the model's weights stored fused
    (``lm.fused_storage``), whose gradient's global norm is summed over the standard layout
    (``fusion.clip_by_global_norm``: the same clipping, bit for bit, as unfused weights get)."""
    warmup = min(self.warmup_steps, max(total_steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, self.learning_rate, warmup, max(total_steps, warmup + 1),
        end_value=self.learning_rate * self.end_factor)
    inner = optax.chain(fusion.clip_by_global_norm(self.grad_clip, fused),
                        optax.adamw(schedule, self.b1, self.b2, self.eps,
                                    weight_decay=self.weight_decay))
    return inner if self.state_dtype is None else in_dtype(inner, self.state_dtype)


def in_dtype(inner: optax.GradientTransformation, dtype: str) -> optax.GradientTransformation:
  """``inner`` with its state and arithmetic in ``dtype``: gradients and params are cast to it on
  the way in, the updates back to each param's dtype on the way out.

  >>> import jax.numpy as jnp
  >>> opt = in_dtype(optax.adam(0.1), "float32")
  >>> params = {"w": jnp.ones(3, jnp.bfloat16)}
  >>> state = opt.init(params)
  >>> state[0].mu["w"].dtype, opt.update(params, state, params)[0]["w"].dtype
  (dtype('float32'), dtype(bfloat16))
  """
  inner = optax.with_extra_args_support(inner)
  cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)

  def init(params):
    return inner.init(cast(params))

  def update(grads, state, params=None, **extra_args):
    # A norm computed of the gradients as they came (``grad_norm``) is not that of the cast ones.
    if any(g.dtype != jnp.dtype(dtype) for g in jax.tree.leaves(grads)):
      extra_args.pop("grad_norm", None)
    updates, state = inner.update(cast(grads), state, None if params is None else cast(params),
                                  **extra_args)
    like = grads if params is None else params
    return jax.tree.map(lambda u, p: u.astype(p.dtype), updates, like), state

  return optax.GradientTransformationExtraArgs(init, update)


ANSWER_WIDTH = judges.ANSWER_WIDTH     # digits of the judge's answer key
# Per-step event counts summed into the stage's summary (the last part of a metric's name ->
# summary key), found however the payoff nests (``agent/rloo/nonfinite_rewards`` under
# ``weighted``); checkpoints carry them, so a resumed stage goes on counting.
COUNTED = {"skipped_nonfinite": "skipped_nonfinite", "no_stop": "no_stop_completions",
           "nonfinite_rewards": "nonfinite_rewards",
           "preference_out_of_range": "preferences_out_of_range"}
PAIR_SOURCES = ("arena_preferences",)


@dataclasses.dataclass(frozen=True)
class Rollout:
  """How the agent plays in a stage where it moves: ``group_size`` sampled completions of each
  prompt, judged by ``judge``."""
  group_size: int = 8
  max_new_tokens: int | None = None     # None: the agent's longest move in the arena's turns
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  prompt_len: int = 16
  # The judge: a responder, "arena" (the arena's verifiable judge, exact match; None means it
  # too) or "reward_model" (the final params of the stage named by ``judge_from``, frozen).
  judge: judges.Responder | str | None = None
  judge_from: str | None = None
  # Multi-turn games: the agent moves ``turns`` times; between its moves ``opponent`` replies
  # (``opponents.arena_feedback()``, ``opponents.fixed_reply(text)``); judges score the last move.
  turns: int = 1
  opponent: Any = None
  # Head to head: a player in the opponent's seat answers each prompt as often as the agent
  # (``mixture('agent', 'reference', beta)``: Nash-MD's opponent, or a follower's name); rows
  # interleave the agent's answers and its (``players.versus``), and the judge compares them
  # (``versus_judge(prefer)``).
  versus: Any = None
  # Score at the sampler's temperature (the TRL / verl convention): the behaviour, the learner's
  # and the reference's log-probs are all of ``logits / temperature``, so the first update's
  # importance ratio is 1 and KL terms refer to the policy that sampled. False: all at
  # temperature 1 (gamejax 0.1), which scores the moves under another policy than the one that
  # sampled them whenever temperature != 1.
  score_at_temperature: bool = True
  # The learner's and the reference's forwards compute each group's prompt once (the record says
  # its rows share it: ``records.SharedPrompt``, ``gamejax.models.shared_prompt``): the same
  # log-probs up to float rounding and ``group_size`` times fewer prompt tokens in those
  # forwards. Off by default, so that a run's figures stay those of the full forward.
  share_prompt: bool = False
  # The sampler's decode loop runs in runs of this many steps, each attending only the KV cache
  # slots filled by its end (``sampling.generate``'s ``cache_block``): on long answers about half
  # the cache read per step. 0: one run over the whole cache (growing it between runs copies it;
  # set 0 where the cache is most of the memory).
  cache_block: int = sampling.DECODE_CACHE_BLOCK

  @property
  def score_temperature(self) -> float:
    """The temperature the stage's log-probs are computed at."""
    return self.temperature if self.score_at_temperature else 1.0


@dataclasses.dataclass(frozen=True)
class Spin:
  """SPIN (self-play fine-tuning, Chen et al. 2024) on a stage's demonstrations: ``iterations``
  rounds of ``steps / iterations`` steps; in each, the previous iterate (the agent's params when
  the round began, a frozen follower named ``"reference"``) answers the prompts by sampling, and
  the stage's payoff (``dpo(beta)``) scores the demonstration over that answer, with the previous
  iterate as its reference. The first round's opponent is the stage's initial model."""
  iterations: int = 3
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int | None = None     # None: the agent's longest move in the arena's turns
  prompt_len: int = 16


@dataclasses.dataclass(frozen=True)
class Player:
  """A learning player: its model (a registered kind, ``registry.MODELS``: ``"policy"``,
  ``"policy_value"``, ``"reward_model"``), payoff, optimizer and starting params.

  ``init_from``: ``"previous"`` (the previous stage's player of the same name, or its only
  player), an earlier stage's name (likewise), ``"stage:player"``, or None (fresh params).
  ``prepare(params, play)`` runs once per step before the updates (``ppo_prepare()``); the step
  makes ``epochs`` passes of ``minibatches`` updates over the moves, each update's gradient
  accumulated over ``grad_accumulation`` microbatches (see ``Stage.grad_accumulation``).
  """
  payoff: Payoff
  optimizer: Optimizer = Optimizer()
  model: str = "policy"
  init_from: str | None = "previous"
  prepare: Any = None
  epochs: int = 1
  minibatches: int = 1
  grad_accumulation: int = 1
  # LoRA adapters (``LoraConfig``): only they learn; the starting params are their frozen base.
  lora: lora_lib.LoraConfig | None = None


AGENT = "agent"          # the name of a stage's inline learner


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
  """One training stage: a game played for ``steps`` steps by its players.

  Without ``game`` the opponent's seat is the data: its moves are the data's game records
  (``batch_size`` packed rows of ``seq_len``), or, with ``rollout``, prompts to which the agent
  samples answers for the judge (``batch_size`` prompts per step). Preference data
  (``arena_preferences``) gives ``batch_size / 2`` pairs per step. With ``game`` (a language game
  of ``gamejax.games``: ``matrix_game(...)``) the step plays ``batch_size`` games, each seat moved
  by the player sitting in it (``seats``).

  The learner is the agent, written inline (``payoff``, ``optimizer``, ``player``, ``init_from``,
  ``prepare``, ``epochs``, ``minibatches``), or several learners in ``learners`` (then the inline
  fields stay unset).
  """
  name: str
  steps: int
  data: DataSpec | None = None
  payoff: Payoff | None = None
  batch_size: int = 32
  seq_len: int = 128
  optimizer: Optimizer = Optimizer()
  steps_per_call: int = 10
  checkpoint_every: int = 1000
  init_from: str | None = "previous"     # "previous", an earlier stage's name, or None (fresh)
  rollout: Rollout | None = None
  # With ``reference``, a frozen copy of the stage's initial params responds with its log-probs
  # of the agent's moves (for KL terms, DPO and IPO).
  reference: bool = False
  # "policy" (the LM), "policy_value" (the LM with a value head on its trunk: PPO's actor-critic)
  # or "reward_model" (the LM trunk with a scalar head, trunk initialised from ``init_from``'s
  # policy params when given).
  player: str = "policy"
  # ``prepare(params, play)`` runs once per step before the updates (``ppo_prepare()``); the step
  # makes ``epochs`` passes of ``minibatches`` updates over the moves.
  prepare: Any = None
  epochs: int = 1
  minibatches: int = 1
  # Gradient accumulation: each update's rows split into this many microbatches whose gradients
  # are computed one after another (less activation memory) and averaged into one optimizer
  # update (``gamejax.step.Learner.accumulate``). Exactly the full-batch update for a payoff that
  # is a mean over rows; a token-mean payoff (imitation) is averaged per microbatch.
  grad_accumulation: int = 1
  # LoRA adapters (``LoraConfig(rank, alpha, targets)``) on the agent: only they learn, its
  # starting params are their frozen base (and, with ``reference``, the reference too).
  lora: lora_lib.LoraConfig | None = None
  # Two-player stages.
  game: Any = None
  learners: Mapping[str, Player] = dataclasses.field(default_factory=dict)
  # seat ("agent", "opponent") -> who sits there: a learner's or a follower's name, a follower
  # (``lagged("agent", every=10)``, then named after the seat), one of the game's scripted
  # players (``scripted("nash")``, also named after the seat) or a geometric mixture of two
  # players (``mixture("agent", "reference", beta)``: Nash-MD's opponent). Default: the only learner sits in
  # both seats (self-play), or learners named after the seats sit in them.
  seats: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  # More frozen followers of the learners, by name (MMD's magnet: ``{"magnet": ema("agent", .99)}``;
  # in a rollout stage, ``{"reference": lagged("agent", every=N)}``: a reference refreshed every
  # N steps instead of the fixed ``reference=True``).
  # Role baselines (``role_baselines(decay)``) are kept here too.
  followers: Mapping[str, selfplay.Follower | selfplay.RoleBaselines] = dataclasses.field(
      default_factory=dict)
  # "simultaneous" (every learner every step) or "alternating" (one learner per step).
  updates: str = "simultaneous"
  # Self-play on the stage's demonstrations against the previous iterate (``Spin``); then
  # ``batch_size`` demonstrations per step make ``2 * batch_size`` rows of moves.
  spin: Spin | None = None
  # Held-out figures (the Evaluation's) every ``eval_every`` steps too, logged as ``eval/...`` in
  # metrics.jsonl and kept in the summary (``accuracy_at``: step -> accuracy).
  eval_every: int | None = None
  # Held-out figures of the stage's starting params too (``accuracy_at["0"]``), before step 1.
  eval_at_start: bool = False
  # A non-finite payoff or gradient: its update is always skipped; "skip" counts it
  # (``skipped_nonfinite``) and plays on, "stop" ends the run at once (exit 1), its last
  # checkpoint being the last good state.
  on_nonfinite: str = "skip"
  # Frozen players taken from earlier stages' final params, by name: ``{"control": "grpo",
  # "start": "sft:agent"}`` ("stage" or "stage:learner"). A game reads them (the red-team game's
  # references and the defenders it compares); they never change and are written once.
  frozen_from: Mapping[str, str] = dataclasses.field(default_factory=dict)

  @property
  def players(self) -> dict[str, Player]:
    """The stage's learners by name (the inline learner is ``"agent"``)."""
    if self.learners:
      return dict(self.learners)
    return {AGENT: Player(payoff=self.payoff, optimizer=self.optimizer, model=self.player,
                          init_from=self.init_from, prepare=self.prepare, epochs=self.epochs,
                          minibatches=self.minibatches, grad_accumulation=self.grad_accumulation,
                          lora=self.lora)}

  @property
  def seated(self) -> dict[str, Any]:
    """seat -> the name of the player sitting in it (a game stage's; see ``seats``)."""
    seats = dict(self.seats)
    learners = list(self.players)
    if not seats:
      if len(learners) == 1:
        return {seat: learners[0] for seat in records.SEATS}
      return {seat: seat for seat in records.SEATS if seat in learners}
    return {seat: seat if isinstance(who, (selfplay.Follower, Scripted)) else who
            for seat, who in seats.items()}

  @property
  def scripted(self) -> dict[str, Scripted]:
    """seat -> the scripted player sitting in it (a frozen player named after the seat)."""
    return {seat: who for seat, who in self.seats.items() if isinstance(who, Scripted)}

  @property
  def all_followers(self) -> dict[str, selfplay.Follower]:
    """Every frozen follower: those in ``seats`` (named after their seat) and ``followers``."""
    out = {seat: who for seat, who in self.seats.items() if isinstance(who, selfplay.Follower)}
    out.update(self.followers)
    return out


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """Held-out exact-match accuracy of greedy answers on the test split of an arena dataset, or,
  with ``verifier`` (``@verifier()``), the verifier's mean score of greedy answers to the test
  prompts of local_text data."""
  data: DataSpec
  num_examples: int = 500
  max_new_tokens: int | None = None     # None: the agent's longest move in the arena's turns
  batch_size: int = 250
  reference_players: Mapping[str, str] = dataclasses.field(default_factory=dict)
  verifier: verifiers.Verifier | None = None


@dataclasses.dataclass(frozen=True)
class Experiment:
  stages: Sequence[Stage]
  model: lm.Config
  evaluation: Evaluation | None = None
  seed: int = 0
  data_dir: str | None = None          # None: $GAMEJAX_DATA_DIR or ~/.cache/gamejax/datasets
  # The device mesh, data x fsdp x tensor (``gamejax.sharding``): mesh_data=-1 takes the devices
  # that are left; the product must be the device count.
  mesh_data: int = -1
  mesh_fsdp: int = 1
  mesh_tensor: int = 1
  keep_checkpoints: int = 2
  # The tokenizer every stage's text goes through: "byte" or "hf:DIR" (tokenizer.json and its chat
  # template; ``gamejax.data.tokenizer.load_tokenizer``). local_text data must name the same.
  tokenizer: str = "byte"

  @property
  def text_tokenizer(self) -> tokenizers.Tokenizer:
    return tokenizers.cached_tokenizer(self.tokenizer)

  def check_mesh(self, n_devices: int | None = None) -> dict:
    """The mesh's shape over ``n_devices`` (default: all); an ExperimentError when the mesh
    settings do not make the device count or a model parameter does not divide over them."""
    try:
      shape = sharding.mesh_shape(self.mesh_data, self.mesh_fsdp, self.mesh_tensor, n_devices)
      if shape["fsdp"] * shape["tensor"] > 1:
        sharding.check_params(
            jax.eval_shape(lambda: lm.init_params(self.model, jax.random.key(0))), shape)
    except sharding.ShardingError as e:
      raise ExperimentError(str(e)) from None
    return shape

  def validate(self) -> None:
    names = [s.name for s in self.stages]
    if not names:
      raise ExperimentError("Experiment.stages is empty: give at least one Stage")
    if len(set(names)) != len(names):
      raise ExperimentError(f"Experiment.stages: stage names must be unique, got {names}")
    try:
      families.of_config(self.model)
    except ValueError as e:
      raise ExperimentError(f"Experiment.model: {e}") from None
    try:
      tok = self.text_tokenizer
    except (ValueError, OSError) as e:
      raise ExperimentError(f"Experiment.tokenizer={self.tokenizer!r}: {e}") from None
    if self.model.vocab_size < tok.vocab_size:
      raise ExperimentError(f"{type(self.model).__name__}.vocab_size={self.model.vocab_size} is "
                            f"smaller than Experiment.tokenizer={self.tokenizer!r}'s "
                            f"{tok.vocab_size} ids: the embedding has no row for some tokens")
    specs = [s.data for s in self.stages if s.data is not None] + (
        [self.evaluation.data] if self.evaluation else [])
    for spec in specs:
      if spec.name not in sources.SOURCES:
        close = difflib.get_close_matches(spec.name, list(sources.SOURCES), n=3, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ExperimentError(f"unknown dataset {spec.name!r}.{hint} Known: {sorted(sources.SOURCES)}")
      if spec.name != "local_text" and self.tokenizer != "byte":
        raise ExperimentError(f"dataset {spec.name!r} is written in byte tokens (the arena's "
                              f"games and judge read them); Experiment.tokenizer="
                              f"{self.tokenizer!r} reads only local_text data")
      if spec.name == "local_text" and spec.params.get("tokenizer", "byte") != self.tokenizer:
        raise ExperimentError(f"local_text(path={spec.params.get('path')!r}) tokenizes with "
                              f"{spec.params.get('tokenizer', 'byte')!r} but "
                              f"Experiment.tokenizer={self.tokenizer!r}; set "
                              f"local_text.tokenizer to the same")
      folder = spec.params.get("path") if spec.name == "local_text" else None
      if folder is not None and not os.path.isdir(folder):
        raise ExperimentError(f"local_text.path={folder!r}: "
                              f"{'not a folder' if os.path.exists(folder) else 'no such folder'}")
    ev = self.evaluation
    if ev is not None and ev.verifier is not None:
      try:
        verifiers.resolve(ev.verifier.path)
      except verifiers.VerifierError as e:
        raise ExperimentError(f"Evaluation.verifier: {e}") from None
      if ev.data.name != "local_text" or not ev.max_new_tokens:
        raise ExperimentError("Evaluation.verifier scores answers to local_text prompts: it "
                              f"needs local_text data (got {ev.data.name!r}) and "
                              "Evaluation.max_new_tokens")
    for i, s in enumerate(self.stages):
      _validate_stage(s, self.stages[:i], self.model)
      if hasattr(s.game, "check"):
        try:
          s.game.check(dict(self.evaluation.data.params) if self.evaluation else None)
        except GameConfigError as e:
          raise ExperimentError(f"Stage {s.name!r}: {e}") from e
      if (s.eval_every is not None or s.eval_at_start) and (
          self.evaluation is None or s.game is not None
                                       or s.player == "reward_model"):
        raise ExperimentError(f"Stage {s.name!r}: eval_every={s.eval_every} evaluates a policy "
                              "stage's held-out accuracy; it needs an Evaluation "
                              "(Experiment.evaluation) and a stage that is no game or reward model")


def _validate_stage(s: Stage, earlier: Sequence[Stage], model) -> None:
  for field in ("steps", "batch_size", "seq_len", "steps_per_call", "checkpoint_every"):
    if getattr(s, field) <= 0:
      raise ExperimentError(f"Stage {s.name!r}: {field} must be positive, got {getattr(s, field)}")
  if s.on_nonfinite not in ("skip", "stop"):
    raise ExperimentError(f"Stage {s.name!r}: on_nonfinite={s.on_nonfinite!r}; expected 'skip' "
                          "or 'stop'")
  if s.steps % s.steps_per_call:
    raise ExperimentError(f"Stage {s.name!r}: steps={s.steps} is not a multiple of "
                          f"steps_per_call={s.steps_per_call}")
  if s.eval_every is not None and (s.eval_every <= 0 or s.eval_every % s.steps_per_call):
    raise ExperimentError(f"Stage {s.name!r}: eval_every={s.eval_every} must be a positive "
                          f"multiple of steps_per_call={s.steps_per_call}")
  if s.learners and s.payoff is not None:
    raise ExperimentError(f"Stage {s.name!r}: give the learner inline (payoff=...) or several in "
                          "learners={...}, not both")
  for name, p in s.players.items():
    _validate_player(s, name, p, earlier, model)
  _validate_frozen_from(s, earlier)
  if s.game is not None:
    _validate_game_stage(s)
    return
  if s.data is None:
    raise ExperimentError(f"Stage {s.name!r}: needs data (a dataset) or a game")
  if len(s.players) > 1 or s.seats:
    raise ExperimentError(f"Stage {s.name!r}: learners and seats need a game "
                          "(game=matrix_game(...)); a stage played on data has one learner")
  _validate_data_followers(s)
  if s.data.too_long not in ("truncate", "skip", "error"):
    raise ExperimentError(f"Stage {s.name!r}: data too_long={s.data.too_long!r}; expected "
                          "'truncate', 'skip' or 'error'")
  if s.data.name in PAIR_SOURCES and s.batch_size % 2:
    raise ExperimentError(f"Stage {s.name!r}: batch_size={s.batch_size} must be even for "
                          f"preference pairs (chosen and rejected rows)")
  if s.player == "policy_value" and s.rollout is None:
    raise ExperimentError(f"Stage {s.name!r}: player='policy_value' (PPO) needs a rollout")
  if s.player == "reward_model" and (s.rollout is not None or s.reference):
    raise ExperimentError(f"Stage {s.name!r}: a reward model learns from preference records; "
                          "it takes no rollout or reference")
  if s.rollout is not None:
    _validate_rollout(s, earlier)
  if s.spin is not None:
    _validate_spin(s)


DATA_FOLLOWERS = ("lagged", "ema", "snapshot")


def _validate_data_followers(s: Stage) -> None:
  """A stage played on data may keep copies of its agent that follow it (``lagged``, ``ema``,
  ``snapshot``), read by its payoffs (probes, magnets); ``"reference"`` among them is its
  reference, refreshed every N steps (SPPO's iterations), instead of ``reference=True``."""
  _check_payoff_reads(s, set(s.followers) | ({"reference"} if s.reference else set()))
  if not s.followers:
    return
  usage = ("followers={'reference': lagged('agent', every=N)} (a reference refreshed every N "
           "steps: SPPO's iterations, instead of reference=True) and copies of the agent its "
           f"payoffs read, of the kinds {list(DATA_FOLLOWERS)}")
  bad = {n: f for n, f in s.followers.items()
         if getattr(f, "learner", None) != AGENT or getattr(f, "kind", None) not in DATA_FOLLOWERS}
  ref = s.followers.get("reference")
  if s.rollout is None or bad or (ref is not None and (s.reference or ref.kind != "lagged")):
    raise ExperimentError(f"Stage {s.name!r}: a stage played on data takes a rollout and "
                          f"{usage}; got followers={dict(s.followers)}, reference={s.reference}")


def _check_payoff_reads(s: Stage, have: set[str]) -> None:
  """Every learner's payoff reads only frozen players the stage keeps (``have``): those it names
  in ``payoff.frozen_players`` (MMD's magnet, a probe's EMA, role baselines)."""
  for name, p in s.players.items():
    for frozen in getattr(p.payoff, "frozen_players", ()):
      if frozen not in have:
        raise ExperimentError(f"Stage {s.name!r}: learner {name!r}'s payoff reads the frozen "
                              f"player {frozen!r}, which the stage does not have (its frozen "
                              f"players: {sorted(have)})")


def _validate_spin(s: Stage) -> None:
  p = s.spin
  if not isinstance(p.iterations, int) or p.iterations < 1:
    raise ExperimentError(f"Stage {s.name!r}: Spin.iterations={p.iterations!r}; SPIN needs at "
                          "least 1 iteration")
  if s.steps % p.iterations:
    raise ExperimentError(f"Stage {s.name!r}: steps={s.steps} do not split into "
                          f"Spin.iterations={p.iterations} equal rounds")
  if s.rollout is not None or s.reference or s.player != "policy":
    raise ExperimentError(f"Stage {s.name!r}: a SPIN stage samples its own answers and brings its "
                          "own reference (the previous iterate): it takes no rollout, no "
                          "reference=True and player='policy'")
  if s.data.name in PAIR_SOURCES:
    raise ExperimentError(f"Stage {s.name!r}: SPIN plays on demonstrations (game records), not "
                          f"on preference pairs ({s.data.name!r})")
  if p.prompt_len < 1 or (p.max_new_tokens or 1) < 1 or not p.temperature >= 0:
    raise ExperimentError(f"Stage {s.name!r}: Spin prompt_len and max_new_tokens must be positive "
                          f"and temperature >= 0; got {p}")
  if p.max_new_tokens is None and s.data.name != "arithmetic_arena":
    raise ExperimentError(f"Stage {s.name!r}: Spin.max_new_tokens must be set for dataset "
                          f"{s.data.name!r} (only the arena implies it)")


def _validate_frozen_from(s: Stage, earlier: Sequence[Stage]) -> None:
  if s.frozen_from and s.game is None:
    raise ExperimentError(f"Stage {s.name!r}: frozen_from={dict(s.frozen_from)} gives a game "
                          "frozen players; the stage plays no game")
  names = [e.name for e in earlier]
  for frozen, source in s.frozen_from.items():
    stage, _, player = str(source).partition(":")
    ok = isinstance(source, str) and stage in names
    if ok:
      players = earlier[names.index(stage)].players
      player = player or (next(iter(players)) if len(players) == 1 else "")
      ok = player in players and players[player].model == "policy"
    if not ok:
      raise ExperimentError(f"Stage {s.name!r}: frozen_from[{frozen!r}]={source!r}; expected "
                            f"an earlier stage's name ({names}) whose only learner is a policy, "
                            "or 'stage:learner' naming a policy")
    if frozen in s.players or frozen in s.all_followers or frozen in s.seats:
      raise ExperimentError(f"Stage {s.name!r}: frozen_from names {frozen!r}, which is already a "
                            "learner, a follower or a seat's player")


def _validate_player(s: Stage, name: str, p: Player, earlier: Sequence[Stage], model) -> None:
  where = f"Stage {s.name!r}" + (f", learner {name!r}" if s.learners else "")
  if not isinstance(p, Player):
    raise ExperimentError(f"{where}: expected a Player(payoff=...), got {p!r}")
  if p.payoff is None:
    raise ExperimentError(f"{where}: no payoff (Stage.payoff, or Player.payoff)")
  for field in ("epochs", "minibatches", "grad_accumulation"):
    if getattr(p, field) <= 0:
      raise ExperimentError(f"{where}: {field} must be positive, got {getattr(p, field)}")
  _check_accumulation(s, where, p)
  if p.model not in registry.MODELS:
    field = "model" if s.learners else "player"
    raise ExperimentError(f"{where}: {field}={p.model!r}; expected one of {sorted(registry.MODELS)}")
  if p.lora is not None:
    _validate_lora(s, where, p, model)
  if interop.is_checkpoint(p.init_from):
    _check_checkpoint(where, p.init_from, model)
    return
  names = [e.name for e in earlier]
  stage, _, player = (p.init_from or "").partition(":")
  ok = p.init_from in (None, "previous") or stage in names
  if ok and player:
    ok = player in earlier[names.index(stage)].players
  if not ok:
    raise ExperimentError(f"{where}: init_from={p.init_from!r}; expected 'previous', None, an "
                          f"earlier stage's name ({names}), 'stage:player', or a checkpoint "
                          "('hf:DIR', 'gguf:FILE')")
  source = earlier[-1] if p.init_from == "previous" and earlier else (
      earlier[names.index(stage)] if stage in names else None)
  if source is not None and not player and name not in source.players and len(source.players) > 1:
    raise ExperimentError(f"{where}: init_from={p.init_from!r} starts from stage "
                          f"{source.name!r}, which has learners {sorted(source.players)} and none "
                          f"named {name!r}; name one (init_from='{source.name}:PLAYER')")


def _check_accumulation(s: Stage, where: str, p: Player) -> None:
  """Each update's rows split into ``grad_accumulation`` equal microbatches of whole prompts
  (groups of completions) or whole preference pairs: ``batch_size`` (prompts, records or games;
  pairs in a preference batch) is a multiple of ``minibatches x grad_accumulation``."""
  n = p.grad_accumulation
  if n == 1:
    return
  pairs = s.data is not None and s.data.name in PAIR_SOURCES
  what = ("preference pairs" if pairs else "games" if s.game is not None else "prompts"
          if s.rollout is not None else "demonstrations" if s.spin is not None else "records")
  units = s.batch_size // 2 if pairs else s.batch_size
  if units % (p.minibatches * n):
    per = f" in each of minibatches={p.minibatches}" if p.minibatches > 1 else ""
    raise ExperimentError(f"{where}: batch_size={s.batch_size} ({units} {what}) does not split "
                          f"into grad_accumulation={n} equal microbatches{per}; make batch_size "
                          f"a multiple of {(2 if pairs else 1) * p.minibatches * n}")


def _validate_lora(s: Stage, where: str, p: Player, model) -> None:
  if not isinstance(p.lora, lora_lib.LoraConfig):
    raise ExperimentError(f"{where}: lora={p.lora!r}; expected a LoraConfig(rank, alpha, targets)")
  if p.model != "policy":
    raise ExperimentError(f"{where}: LoRA adapts a policy; this learner is a {p.model!r}")
  if s.spin is not None or s.all_followers:
    raise ExperimentError(f"{where}: a LoRA learner cannot have followers (lagged, ema, league, "
                          "SPIN's previous iterate) yet; train it with full parameters")
  try:
    lora_lib.targets(model, p.lora)
  except lora_lib.LoraConfigError as e:
    raise ExperimentError(f"{where}: {e}") from None


def _check_checkpoint(where: str, spec: str, model) -> None:
  """A learner that starts from checkpoint ``spec`` needs ``Experiment.model`` to be its config
  (``@pretrained_model()``); the checkpoint must be readable."""
  try:
    theirs = interop.checkpoint_config(spec, dtype=model.dtype, param_dtype=model.param_dtype,
                                       remat=getattr(model, "remat", "none"))
  except (ValueError, OSError) as e:
    raise ExperimentError(f"{where}: init_from={spec!r}: {e}") from None
  if theirs != model:
    diff = ({"family": (type(model).__name__, type(theirs).__name__)}
            if type(theirs) is not type(model) else
            {f.name: (getattr(model, f.name), getattr(theirs, f.name))
             for f in dataclasses.fields(theirs) if getattr(model, f.name) != getattr(theirs, f.name)})
    raise ExperimentError(f"{where}: init_from={spec!r} holds another model than "
                          f"Experiment.model (field: (Experiment.model's, the checkpoint's)): "
                          f"{diff}; set Experiment.model = @pretrained_model() with "
                          f"pretrained_model.checkpoint = {spec!r}")


def _validate_game_stage(s: Stage) -> None:
  if s.updates not in ("simultaneous", "alternating"):
    raise ExperimentError(f"Stage {s.name!r}: updates={s.updates!r}; expected 'simultaneous' or "
                          "'alternating'")
  if s.data is not None or s.rollout is not None or s.reference:
    raise ExperimentError(f"Stage {s.name!r}: a game stage plays its own game; it takes no data, "
                          "rollout or reference")
  learners = s.players
  seats = dict(s.seats)
  for seat in seats:
    if seat not in records.SEATS:
      raise ExperimentError(f"Stage {s.name!r}: seats has {seat!r}; the game's seats are "
                            f"{list(records.SEATS)}")
  followers = s.all_followers
  clash = sorted(set(learners) & set(followers))
  if clash:
    raise ExperimentError(f"Stage {s.name!r}: {clash} name both a learner and a follower")
  for seat, who in s.scripted.items():
    if not hasattr(s.game, "scripted_policy"):
      raise ExperimentError(f"Stage {s.name!r}: seats[{seat!r}] is scripted, but the game "
                            f"{getattr(s.game, 'name', s.game)!r} has no scripted players")
    if seat in learners or seat in s.followers:
      raise ExperimentError(f"Stage {s.name!r}: seats[{seat!r}] is scripted, so {seat!r} names "
                            "its player; a learner or a follower has that name too")
    try:
      who.value(s.game, seat)
    except GameConfigError as e:
      raise ExperimentError(f"Stage {s.name!r}: {e}") from e
  scripted = set(s.scripted)
  for name, f in followers.items():
    if f.learner is not None and f.learner not in learners:
      raise ExperimentError(f"Stage {s.name!r}: follower {name!r} follows {f.learner!r}, which is "
                            f"not a learner of the stage ({sorted(learners)})")
  seated = s.seated
  for seat in records.SEATS:
    if seat not in seated:
      raise ExperimentError(f"Stage {s.name!r}: seat {seat!r} has no player (no policy); set "
                            f"seats={{{seat!r}: ...}} to a learner ({sorted(learners)}), a "
                            "follower (lagged/ema/snapshot/league) or a scripted player")
    who = seated[seat]
    for part in getattr(who, "parts", ()):
      if part not in learners and part not in followers:
        raise ExperimentError(f"Stage {s.name!r}: seats[{seat!r}] mixes {part!r}, which is no "
                              f"player of the stage; the learners are {sorted(learners)}, the "
                              f"followers {sorted(followers)}")
    if isinstance(who, selfplay.Mixture) or seat in scripted:
      continue
    if who not in learners and who not in followers:
      raise ExperimentError(f"Stage {s.name!r}: seats[{seat!r}]={who!r} is no player of the "
                            f"stage; the learners are {sorted(learners)}, the followers "
                            f"{sorted(followers)}")
  for name, p in learners.items():
    if p.model != "policy":
      raise ExperimentError(f"Stage {s.name!r}: learner {name!r} is a {p.model!r}; a game's "
                            "players are policies")
    wanted = getattr(p.payoff, "group_size", None)
    game_groups = getattr(s.game, "group_size", None)
    if wanted is not None and wanted != game_groups:
      raise ExperimentError(
          f"Stage {s.name!r}: learner {name!r}'s payoff groups {wanted} completions of a prompt "
          f"(GRPO/RLOO); " + ("a game stage plays independent games" if game_groups is None else
                              f"the game plays groups of {game_groups}"))
  for frozen in getattr(s.game, "frozen_players", lambda: ())():
    if frozen not in followers and frozen not in s.frozen_from:
      raise ExperimentError(f"Stage {s.name!r}: the game reads the frozen player {frozen!r}, which "
                            f"the stage does not have (its followers: {sorted(followers)}; "
                            f"frozen_from: {sorted(s.frozen_from)})")
  _check_payoff_reads(s, set(followers))
  sitting = {part for who in seated.values() for part in getattr(who, "parts", (who,))}
  unused = sorted(set(learners) - sitting)
  if unused:
    raise ExperimentError(f"Stage {s.name!r}: learners {unused} sit in no seat")


def _validate_rollout(s: Stage, earlier: Sequence[Stage]) -> None:
  r = s.rollout
  if r.judge == "reward_model":
    players = {e.name: e.player for e in earlier}
    if players.get(r.judge_from) != "reward_model":
      raise ExperimentError(f"Stage {s.name!r}: Rollout.judge='reward_model' needs judge_from "
                            f"naming an earlier reward_model stage; got {r.judge_from!r}")
  elif isinstance(r.judge, verifiers.Verifier):
    try:
      verifiers.resolve(r.judge.path)
    except verifiers.VerifierError as e:
      raise ExperimentError(f"Stage {s.name!r}: Rollout.judge: {e}") from None
    if s.data.name != "local_text":
      raise ExperimentError(f"Stage {s.name!r}: a verifier reads its prompts' text from "
                            f"local_text data; the stage reads {s.data.name!r}")
  elif isinstance(r.judge, str) and r.judge not in registry.JUDGES:
    raise ExperimentError(f"Stage {s.name!r}: Rollout.judge={r.judge!r}; expected one of "
                          f"{sorted(registry.JUDGES)} or a responder function")
  if r.judge in (None, "arena") and s.data.name != "arithmetic_arena":
    raise ExperimentError(f"Stage {s.name!r}: Rollout.judge must be set for dataset "
                          f"{s.data.name!r} (the default judge is the arena's)")
  if r.turns < 1 or (r.turns > 1) != (r.opponent is not None):
    raise ExperimentError(f"Stage {s.name!r}: Rollout.turns={r.turns} needs an opponent "
                          "exactly when turns > 1")
  if r.group_size < 1 or r.prompt_len < 1 or (r.max_new_tokens or 1) < 1:
    raise ExperimentError(f"Stage {s.name!r}: Rollout group_size, prompt_len and "
                          f"max_new_tokens must be positive; got {r}")
  if isinstance(r.cache_block, bool) or not isinstance(r.cache_block, int) or r.cache_block < 0:
    raise ExperimentError(f"Stage {s.name!r}: Rollout.cache_block must be an int >= 0 (0: the "
                          f"decode loop in one run); got {r.cache_block!r}")
  if r.share_prompt and (r.versus is not None or s.player != "policy"):
    raise ExperimentError(f"Stage {s.name!r}: Rollout.share_prompt computes each group's prompt "
                          "once in a language model's forward: it needs player='policy' and no "
                          f"Rollout.versus; got player={s.player!r}, versus={r.versus!r}")
  if r.max_new_tokens is None and s.data.name != "arithmetic_arena":
    raise ExperimentError(f"Stage {s.name!r}: Rollout.max_new_tokens must be set for "
                          f"dataset {s.data.name!r} (only the arena implies it)")
  if r.versus is not None:
    parts = getattr(r.versus, "parts", (r.versus,))
    have = {"agent"} | ({"reference"} if s.reference else set()) | set(s.followers)
    if any(not isinstance(p, str) or p not in have for p in parts):
      raise ExperimentError(f"Stage {s.name!r}: Rollout.versus={r.versus!r} is played by "
                            f"{list(parts)}; the stage's players are {sorted(have)} (Nash-MD's "
                            "mixture('agent', 'reference', beta) needs Stage.reference=True)")
    if not getattr(r.judge, "versus", False) or r.turns != 1:
      raise ExperimentError(f"Stage {s.name!r}: Rollout.versus compares the agent's answer with "
                            "its opponent's: it needs a judge of pairs (versus_judge(prefer)) and "
                            "turns=1")
    answers = getattr(r.judge, "opponent_answers", 1)
    if answers not in (1, r.group_size):
      raise ExperimentError(f"Stage {s.name!r}: versus_judge.group_size={answers} compares each "
                            f"answer with that many of the opponent's; each player gives "
                            f"Rollout.group_size={r.group_size} per prompt (use 1 or "
                            f"{r.group_size})")
  elif getattr(r.judge, "versus", False):
    raise ExperimentError(f"Stage {s.name!r}: Rollout.judge is a versus_judge; it compares the "
                          "agent with an opponent: set Rollout.versus")
  if hasattr(r.judge, "prefer"):
    try:
      judges.check_preference(r.judge.prefer, r.judge.group_size)
    except ValueError as e:
      raise ExperimentError(f"Stage {s.name!r}: {e}") from e
  wanted = getattr(s.payoff, "group_size", None)
  if wanted is not None and wanted != r.group_size:
    raise ExperimentError(f"Stage {s.name!r}: the payoff groups {wanted} completions per "
                          f"prompt but Rollout.group_size={r.group_size}")
  if wanted is not None and s.minibatches > 1:
    raise ExperimentError(f"Stage {s.name!r}: minibatches={s.minibatches} would split the groups "
                          f"of {wanted} completions the payoff compares; use minibatches=1")


