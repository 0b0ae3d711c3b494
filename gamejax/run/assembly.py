"""Assembly: a stage's description turned into the step's pieces -- its loader, its ``Game``
(learners, play, respond, followers) and its initial ``GameState``.

Model kinds and judges come from ``registry``; a game stage's play and judge from its game
(``gamejax.games``). Learners are keyed by name everywhere (``state.params["agent"]``), so a
stage with one inline learner and one with several go through the same code.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gamejax import interop, step as game_step
from gamejax.data.loader import PackedLoader
from gamejax.data.pairs import PairLoader
from gamejax.data.prompts import DemonstrationLoader, PromptLoader
from gamejax.evaluation import arena as arena_eval
from gamejax.models import lm, lora
from gamejax.players import (judges, policy, reference as reference_player, selfplay, spin,
                             verifiers, versus)
from gamejax.run import registry
from gamejax.run.schema import ANSWER_WIDTH, PAIR_SOURCES, Experiment, Stage


class GamesLoader:
  """Batches of a game that needs no data: ``{"games": int32[batch_size]}`` (the game's rows)."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size
    self.stats: dict = {}
    self.rows = slice(0, batch_size)

  def only_rows(self, rows: slice) -> None:
    self.rows = rows

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return {"games": np.zeros((len(range(*self.rows.indices(self.batch_size))),), np.int32)}

  def get_state(self) -> dict:
    return {}

  def set_state(self, state: Mapping[str, Any]) -> None:
    del state


def packs_records(stage: Stage) -> bool:
  """Whether the stage reads packed game records (``PackedLoader``): not a game, pairs, prompts
  or SPIN's demonstrations."""
  return (stage.game is None and stage.data.name not in PAIR_SOURCES and stage.rollout is None
          and stage.spin is None)


def stage_loader(exp: Experiment, index: int, source):
  """The stage's batches: packed game records, preference pairs, prompts (with the arena's
  answer key), or, for a game stage, game rows."""
  stage = exp.stages[index]
  seed = exp.seed * 1000 + index
  if stage.game is not None:
    return GamesLoader(stage.batch_size)
  if stage.data.name in PAIR_SOURCES:
    return PairLoader(source, stage.batch_size // 2, stage.seq_len, seed=seed)
  if packs_records(stage):
    return PackedLoader(source, stage.batch_size, stage.seq_len, seed=seed,
                        too_long=stage.data.too_long)
  width = ANSWER_WIDTH if stage.data.name == "arithmetic_arena" else 0
  if stage.spin is not None:
    return DemonstrationLoader(source, stage.batch_size, stage.spin.prompt_len, seed=seed,
                               seq_len=stage.seq_len, answer_width=width)
  return PromptLoader(source, stage.batch_size, stage.rollout.prompt_len, seed=seed,
                      answer_width=width)


def learner_apply(exp: Experiment, stage: Stage, model: str, seat: str | None = None):
  """A learner's ``apply``: its model kind's, at the stage's scoring temperature when it is a
  policy (in a game that samples text, ``seat``'s: ``game.score_temperature(seat)``), masked to
  the game's legal moves in a game stage."""
  kind = registry.MODELS[model]
  apply = kind.apply(exp.model)
  if kind.samples and stage.rollout is not None:
    apply = policy.at_temperature(apply, stage.rollout.score_temperature)
  if stage.game is not None:
    apply = stage.game.mask(apply, exp.model.vocab_size)
    if seat is not None and hasattr(stage.game, "score_temperature"):
      apply = policy.at_temperature(apply, stage.game.score_temperature(seat))
  return apply


def learner_seat(stage: Stage, name: str) -> str | None:
  """The one seat learner ``name`` sits in (None: both, or a stage without seats)."""
  if stage.game is None:
    return None
  seats = [seat for seat, who in stage.seated.items() if who == name]
  return seats[0] if len(seats) == 1 else None


def pair_rows(stage: Stage) -> bool:
  """Whether the stage's moves are a preference batch, chosen rows then rejected rows (preference
  data, SPIN's demonstrations then answers): gradient accumulation keeps the pairs together."""
  return stage.spin is not None or (stage.data is not None and stage.data.name in PAIR_SOURCES)


def stage_game(exp: Experiment, index: int) -> game_step.Game:
  """The game of stage ``index``: its learners, how moves are made and who responds."""
  stage, cfg = exp.stages[index], exp.model
  fused = lm.fused_storage(cfg)   # the gradient norm is summed over the standard layout
  learners = {
      name: game_step.Learner(apply=learner_apply(exp, stage, p.model, learner_seat(stage, name)),
                              payoff=p.payoff,
                              optimizer=p.optimizer.build(stage.steps, fused), prepare=p.prepare,
                              epochs=p.epochs, minibatches=p.minibatches,
                              accumulate=p.grad_accumulation, halves=pair_rows(stage),
                              fused=fused)
      for name, p in stage.players.items()}
  if stage.game is not None:
    followers = stage.all_followers
    return game_step.Game(
        learners=learners,
        play=stage.game.play_fn(learner_apply(exp, stage, "policy"), stage.seated,
                                game_step.player_params, model=cfg),
        respond=stage.game.respond_fn(
            cfg.vocab_size, apply_of=lambda seat: learner_apply(exp, stage, "policy", seat)),
        after=selfplay.follow(followers).after if followers else None,
        updates=stage.updates)
  if stage.spin is not None:
    return spin_game(exp, stage, learners)
  r = stage.rollout
  reference_apply = learner_apply(exp, stage, "policy")
  refreshed = "reference" in stage.followers
  parts = [reference_player.reference(reference_apply)] if stage.reference or refreshed else []
  if r is None:
    respond = judges.responders(*parts) if parts else game_step.no_response
    return game_step.Game(learners=learners, respond=respond)
  budget = r.max_new_tokens or arena_eval.answer_budget(dict(stage.data.params))
  sampler = functools.partial(policy.sampled_play, cfg, r.group_size, budget, r.temperature,
                              r.top_k, r.top_p, eos_id=exp.text_tokenizer.eos_id,
                              params_of=registry.MODELS[stage.player].policy,
                              scaled_logprobs=r.score_at_temperature,
                              cache_block=r.cache_block)
  play = sampler(turns=r.turns, opponent=r.opponent, share_prompt=r.share_prompt)
  if r.versus is not None:
    play = versus.versus_play(play, sampler(player=r.versus))
  if isinstance(r.judge, verifiers.Verifier):
    judge = verifier_responder(exp, stage, r.judge)
  elif isinstance(r.judge, (str, type(None))):
    judge = registry.JUDGES[r.judge or "arena"](cfg)
  else:
    judge = r.judge
  return game_step.Game(learners=learners, play=play, respond=judges.responders(judge, *parts),
                        after=selfplay.follow(stage.followers).after if stage.followers else None)


def verifier_responder(exp: Experiment, stage: Stage, spec: verifiers.Verifier):
  """The verifier judge of a stage on local_text data: prompts' text from their JSONL lines,
  completions decoded by the experiment's tokenizer."""
  from gamejax.data import sources
  source = stage.data.load("train", sources.resolve_data_dir(exp.data_dir))
  return verifiers.verifier_judge(verifiers.resolve(spec.path), exp.text_tokenizer,
                                  verifiers.local_text_prompts(source, stage.data.params["path"]),
                                  seat=spec.seat, name=spec.path)


def spin_followers(stage: Stage) -> dict[str, selfplay.Follower]:
  """A SPIN stage's previous iterate: the agent's params, refreshed at each iteration's start."""
  if stage.spin is None:
    return {}
  return {spin.OPPONENT: selfplay.lagged("agent", every=stage.steps // stage.spin.iterations)}


def spin_game(exp: Experiment, stage: Stage, learners) -> game_step.Game:
  """SPIN: the previous iterate samples an answer to each demonstration's prompt; the payoff
  scores demonstration over sample, the previous iterate's log-probs as its reference."""
  p = stage.spin
  budget = p.max_new_tokens or arena_eval.answer_budget(dict(stage.data.params))
  sample = policy.sampled_play(exp.model, 1, budget, p.temperature, p.top_k, p.top_p,
                               eos_id=exp.text_tokenizer.eos_id, player=spin.OPPONENT)
  followers = spin_followers(stage)
  return game_step.Game(
      learners=learners, play=spin.spin_play(sample),
      respond=reference_player.reference(learner_apply(exp, stage, "policy"), spin.OPPONENT),
      after=selfplay.follow(followers).after)


def lora_base(stage: Stage, name: str) -> str:
  """The frozen player that holds LoRA learner ``name``'s base: the stage's reference when the
  stage has one (the base is the reference, held once), else ``"<name>/base"``."""
  return "reference" if stage.reference and name == "agent" else f"{name}/base"


def stage_state(exp: Experiment, index: int, game: game_step.Game, players: Mapping[str, Any],
                judge_params=None, earlier: Mapping[str, Any] | None = None
                ) -> game_step.GameState:
  """The stage's initial state from its learners' ``players`` params (the agent's is also the
  frozen reference's), its followers' copies, the frozen players taken from ``earlier`` stages
  (``Stage.frozen_from``: name -> params, see ``earlier_players``) and, when its rollout is
  judged by a reward model, that model's ``judge_params``.

  Every leaf is a fresh copy: the step donates the state, and ``players`` may still be needed
  (another stage starts from them).
  """
  stage = exp.stages[index]
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  frozen = {}
  bases = {p.adapters.base: p.base for p in players.values() if isinstance(p, lora.Adapted)}
  players = {name: p.adapters if isinstance(p, lora.Adapted) else p for name, p in players.items()}
  if stage.reference and "reference" not in bases:
    frozen["reference"] = copy(registry.MODELS[stage.player].policy(players["agent"]))
  frozen.update({name: copy(base) for name, base in bases.items()})
  if stage.rollout is not None and stage.rollout.judge == "reward_model":
    frozen[judges.JUDGE] = copy(judge_params)
  frozen.update(selfplay.init_followers({**stage.all_followers, **spin_followers(stage)},
                                        players))
  frozen.update({seat: who.value(stage.game, seat) for seat, who in stage.scripted.items()})
  frozen.update({name: copy(params) for name, params in (earlier or {}).items()})
  rng = jax.random.fold_in(jax.random.PRNGKey(exp.seed), index)
  return game_step.init_state(game, {name: copy(p) for name, p in players.items()}, rng, frozen)


def constant_players(exp: Experiment, index: int) -> tuple[str, ...]:
  """The frozen players of stage ``index`` that never change while it plays (its reference, its
  reward-model judge, snapshots, scripted players): checkpoints write them once."""
  stage = exp.stages[index]
  names = ["reference"] if stage.reference else []
  names += [b for b in (lora_base(stage, n) for n, p in stage.players.items() if p.lora)
            if b not in names]
  if stage.rollout is not None and stage.rollout.judge == "reward_model":
    names.append(judges.JUDGE)
  names += [n for n, f in stage.all_followers.items() if getattr(f, "kind", None) == "snapshot"]
  names += list(stage.scripted)
  names += list(stage.frozen_from)
  return tuple(names)


def earlier_players(exp: Experiment, index: int,
                    finals: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
  """The frozen players stage ``index`` takes from earlier stages (``Stage.frozen_from``), by
  name: the named learner's final policy params in ``finals`` (stage -> learner -> params), or
  fresh params of the same shapes when ``finals`` is None (a restore's target)."""
  stage = exp.stages[index]
  out = {}
  for name, source in stage.frozen_from.items():
    stage_name, _, player = source.partition(":")
    if finals is None:
      out[name] = registry.MODELS["policy"].init(exp.model, jax.random.PRNGKey(0), None)
      continue
    got = finals.get(stage_name)
    if got is None:
      raise KeyError(f"stage {stage.name!r}: frozen_from[{name!r}] reads stage {stage_name!r}, "
                     "which has no final params (not played yet)")
    out[name] = got[player] if player else next(iter(got.values()))
  return out


def initial_players(exp: Experiment, index: int,
                    finals: Mapping[str, Mapping[str, Any]] | None = None,
                    mesh=None) -> dict[str, Any]:
  """Each learner's starting params, by name: from an earlier stage (``finals``: stage name ->
  its learners' final params; see ``Player.init_from``) or fresh ones."""
  stage = exp.stages[index]
  players = stage.players
  base = jax.random.fold_in(jax.random.PRNGKey(exp.seed), 10_000 + index)
  out = {}
  for j, (name, p) in enumerate(sorted(players.items())):
    rng = base if len(players) == 1 else jax.random.fold_in(base, j)
    init = source_params(exp, index, name, p.init_from, finals or {}, mesh)
    out[name] = registry.MODELS[p.model].init(exp.model, rng, init)
    if p.lora is not None:
      adapters = lora.init(exp.model, p.lora, jax.random.fold_in(rng, 1), lora_base(stage, name))
      out[name] = lora.Adapted(adapters=adapters, base=out[name])
  return out


def source_params(exp: Experiment, index: int, name: str, init_from: str | None,
                  finals: Mapping[str, Mapping[str, Any]], mesh=None):
  """The params ``init_from`` names for learner ``name`` of stage ``index`` (None: fresh); a
  checkpoint's are read tensor by tensor into their sharding on ``mesh`` when given."""
  if init_from is None:
    return None
  if interop.is_checkpoint(init_from):
    m = exp.model
    return interop.load_checkpoint(init_from, mesh=mesh, dtype=m.dtype,
                                   param_dtype=m.param_dtype)[1]
  stage_name, _, player = init_from.partition(":")
  if stage_name == "previous":
    if index == 0:
      return None
    stage_name = exp.stages[index - 1].name
  got = finals.get(stage_name)
  if got is None:
    return None
  if player:
    return got[player]
  if name in got:
    return got[name]
  if len(got) == 1:
    return next(iter(got.values()))
  raise KeyError(f"stage {exp.stages[index].name!r}: learner {name!r} starts from stage "
                 f"{stage_name!r}, which has learners {sorted(got)}; name one "
                 f"(init_from='{stage_name}:PLAYER')")


def policies_of(exp: Experiment, index: int, players: Mapping[str, Any]) -> dict[str, Any]:
  """The policy inside each learner's params (an actor-critic's policy), by name."""
  stage = exp.stages[index]
  return {name: registry.MODELS[p.model].policy(players[name])
          for name, p in stage.players.items()}


def resolved_players(players: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict[str, Any]:
  """Each learner's params as its model reads them (LoRA adapters merged into their base)."""
  return {name: game_step.with_frozen(p, frozen) for name, p in players.items()}


