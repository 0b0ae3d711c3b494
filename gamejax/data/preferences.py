"""TFDS builder of preference pairs from the arithmetic arena: two answers to one question.

Per problem, two scripted players (drawn by weight, independently) answer the SAME question; the
answer with the better grade ``(exact, partial credit)`` of :func:`arithmetic.grade` is "chosen",
the other "rejected". When the two grades tie, both players and answers are re-drawn (up to
``_TRIES`` times) and otherwise the problem is skipped, so every pair is strictly ordered and no
pair has two identical transcripts. Problems come from the arena's train / test split logic
(a stable hash of the question), so the splits are disjoint; test problems are unique.

Config names are a readable prefix plus a hash of every parameter, as in ``arena.py``.

>>> cfg = preferences_config(max_digits=2, players=[("perfect", 1), ("drop_carry:0", 1)])
>>> cfg.name  # doctest: +ELLIPSIS
'pairs_add-sub_d1-2_worked_...'
>>> next(generate_pairs(cfg, "train", 1))[1]["chosen_player"]  # doctest: +SKIP
'perfect'
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from gamejax.data import arena
from gamejax.data.errors import DataError
from gamejax.games import arithmetic

DEFAULT_PLAYERS = (("perfect", 1.0), ("drop_carry:0", 1.0), ("slip:0.1", 1.0))
_OP_NAMES = {"+": "add", "-": "sub"}
_TRIES = 8            # draws of two answers per problem before the problem is skipped
_MAX_SKIPPED = 1_000  # problems skipped in a row before generation gives up

PARAM_NAMES = ("min_digits", "max_digits", "ops", "test_fraction", "pad", "worked", "players",
               "num_train", "num_test", "seed")


@dataclasses.dataclass(eq=False)
class PreferencesBuilderConfig(tfds.core.BuilderConfig):
  """All parameters of a preference-pair dataset; build one with :func:`preferences_config`."""
  min_digits: int = 1
  max_digits: int = 3
  ops: tuple[str, ...] = arithmetic.OPS
  test_fraction: float = 0.1
  pad: bool = True
  worked: bool = True
  players: tuple[tuple[str, float], ...] = DEFAULT_PLAYERS
  num_train: int = 20_000
  num_test: int = 500
  seed: int = 0

  @property
  def arena(self) -> arithmetic.ArenaConfig:
    return arithmetic.ArenaConfig(min_digits=self.min_digits, max_digits=self.max_digits,
                                  ops=self.ops, test_fraction=self.test_fraction, pad=self.pad)

  def params(self) -> dict[str, Any]:
    """The generation parameters as a JSON-serialisable dict (what the config name hashes)."""
    return {"min_digits": self.min_digits, "max_digits": self.max_digits, "ops": list(self.ops),
            "test_fraction": self.test_fraction, "pad": self.pad, "worked": self.worked,
            "players": [list(p) for p in self.players], "num_train": self.num_train,
            "num_test": self.num_test, "seed": self.seed}


def preferences_config(*, min_digits: int = 1, max_digits: int = 3,
                       ops: Sequence[str] = arithmetic.OPS, test_fraction: float = 0.1,
                       pad: bool = True, worked: bool = True, players=DEFAULT_PLAYERS,
                       num_train: int = 20_000, num_test: int = 500,
                       seed: int = 0) -> PreferencesBuilderConfig:
  """A validated :class:`PreferencesBuilderConfig`, named ``pairs_<ops>_d<lo>-<hi>_<style>_<hash>``.

  ``players``: scripted player specs with weights, as for the arena (``arena.normalize_players``).

  >>> preferences_config(ops="+", max_digits=2, worked=False).name.startswith("pairs_add_d1-2_answer_")
  True
  """
  cfg_arena = arithmetic.ArenaConfig(min_digits=int(min_digits), max_digits=int(max_digits),
                                     ops=tuple(ops), test_fraction=float(test_fraction),
                                     pad=bool(pad))
  players = arena.normalize_players(players)
  if int(num_train) < 1 or int(num_test) < 0:
    raise DataError(f"arena preferences need num_train >= 1 and num_test >= 0, got "
                    f"num_train={num_train}, num_test={num_test}")
  cfg = PreferencesBuilderConfig(
      name="pending", min_digits=cfg_arena.min_digits, max_digits=cfg_arena.max_digits,
      ops=cfg_arena.ops, test_fraction=cfg_arena.test_fraction, pad=cfg_arena.pad,
      worked=bool(worked), players=players, num_train=int(num_train), num_test=int(num_test),
      seed=int(seed))
  params_json = json.dumps(cfg.params(), sort_keys=True)
  digest = hashlib.sha256(params_json.encode("utf-8")).hexdigest()[:10]
  ops_name = "-".join(_OP_NAMES[op] for op in cfg_arena.ops)
  style = "worked" if cfg.worked else "answer"
  cfg.name = f"pairs_{ops_name}_d{cfg_arena.min_digits}-{cfg_arena.max_digits}_{style}_{digest}"
  cfg.description = params_json
  return cfg


def _answer(problem, player, rng, cfg: PreferencesBuilderConfig):
  """``(solution, (exact, partial))`` of ``player`` on ``problem``."""
  solution = player.solve(problem, rng, cfg.arena.width)
  text = arithmetic.worked_text(solution) if cfg.worked else arithmetic.answer_text(solution)
  return solution, arithmetic.grade(problem, text)


def generate_pairs(cfg: PreferencesBuilderConfig, split: str,
                   num_examples: int) -> Iterator[tuple[str, dict]]:
  """Iterator of ``(key, example)``: ``num_examples`` strictly ordered pairs of ``split``.

  Deterministic given ``cfg.seed``. Raises ``DataError`` when the players keep tying (e.g. only
  ``perfect`` players: no answer is ever better than another).
  """
  parsed = [arithmetic.parse_player(spec) for spec, _ in cfg.players]
  weights = np.asarray([w for _, w in cfg.players], np.float64)
  weights = weights / weights.sum()
  # The trailing 1 keeps these streams apart from the arena dataset's of the same seed.
  problem_seq, player_seq = np.random.SeedSequence(
      [cfg.seed, arithmetic.SPLITS.index(split), 1]).spawn(2)
  # The arena's split logic: train / test by a stable hash of the question, test never repeats.
  stream = arithmetic.problem_stream(
      np.random.default_rng(problem_seq), cfg.arena, split)
  rng = np.random.default_rng(player_seq)
  width = cfg.arena.width
  made, skipped = 0, 0
  while made < num_examples:
    problem = next(stream)
    for _ in range(_TRIES):
      first, second = (parsed[int(i)] for i in rng.choice(len(parsed), size=2, p=weights))
      sol_1, grade_1 = _answer(problem, first, rng, cfg)
      sol_2, grade_2 = _answer(problem, second, rng, cfg)
      if grade_1 != grade_2:
        break
    else:
      skipped += 1
      if skipped >= _MAX_SKIPPED:
        raise DataError(
            f"arena preferences {cfg.name}: players {[s for s, _ in cfg.players]} gave equally "
            f"graded answers to {skipped} problems in a row ({_TRIES} draws each); pairs need "
            f"players of different accuracy (e.g. 'perfect' with 'drop_carry:0' or 'slip:0.1')")
      continue
    skipped = 0
    if grade_2 > grade_1:
      first, second, sol_1, sol_2 = second, first, sol_2, sol_1
    chosen_tokens, chosen_players = arithmetic.transcript(problem, sol_1, cfg.worked, False, width)
    rejected_tokens, rejected_players = arithmetic.transcript(problem, sol_2, cfg.worked, False,
                                                              width)
    yield f"{split}_{made}", {
        "chosen_tokens": chosen_tokens.astype(np.int32),
        "chosen_players": chosen_players.astype(np.int8),
        "rejected_tokens": rejected_tokens.astype(np.int32),
        "rejected_players": rejected_players.astype(np.int8),
        "a": np.int64(problem.a), "b": np.int64(problem.b), "op": problem.op,
        "answer": np.int64(problem.answer), "chosen_player": first.name,
        "rejected_player": second.name}
    made += 1


class ArenaPreferences(tfds.core.GeneratorBasedBuilder):
  """Preference pairs of the arithmetic arena; construct with ``config=preferences_config(...)``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  code_path = None  # nothing downloaded: no URL checksums to look up next to the code

  def __init__(self, *, config: PreferencesBuilderConfig, data_dir: str, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, data_dir=data_dir, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    seq = lambda dtype: tfds.features.Tensor(shape=(None,), dtype=dtype)
    return tfds.core.DatasetInfo(
        builder=self,
        description="Chosen / rejected answers of scripted players to one arena question "
                    "(gamejax.data.preferences.generate_pairs).",
        features=tfds.features.FeaturesDict({
            "chosen_tokens": seq(np.int32), "chosen_players": seq(np.int8),
            "rejected_tokens": seq(np.int32), "rejected_players": seq(np.int8),
            "a": tfds.features.Scalar(dtype=np.int64),
            "b": tfds.features.Scalar(dtype=np.int64),
            "op": tfds.features.Text(),
            "answer": tfds.features.Scalar(dtype=np.int64),
            "chosen_player": tfds.features.Text(),
            "rejected_player": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    splits = {"train": self._generate_examples("train", cfg.num_train)}
    if cfg.num_test:
      splits["test"] = self._generate_examples("test", cfg.num_test)
    return splits

  def _generate_examples(self, split: str, num_examples: int):
    return generate_pairs(self.builder_config, split, num_examples)
