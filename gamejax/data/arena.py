"""TFDS builder for the arithmetic arena: transcripts of scripted players solving problems.

Every generation parameter lives in the :class:`ArenaBuilderConfig`; its *name* is a readable prefix
plus a short hash of the parameters, so the same parameters reuse the files already built under
``data_dir`` and different ones build a new dataset next to them. Splits: "train" and "test" (the
test split is left out when ``num_test == 0``); features are those of
:func:`gamejax.games.arithmetic.generate_examples`.

>>> cfg = arena_config(max_digits=2, players=[("drop_carry:0", 1.0)], num_train=100, num_test=10)
>>> cfg.name  # doctest: +ELLIPSIS
'add-sub_d1-2_worked_...'
>>> builder = ArithmeticArena(config=cfg, data_dir="/tmp/gamejax_doctest")  # doctest: +SKIP
>>> builder.download_and_prepare()  # built once, reused afterwards  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from gamejax.data.errors import DataError
from gamejax.games import arithmetic

_OP_NAMES = {"+": "add", "-": "sub"}
DEFAULT_PLAYERS = (("drop_carry:0", 1.0),)


@dataclasses.dataclass(eq=False)
class ArenaBuilderConfig(tfds.core.BuilderConfig):
  """All parameters of an arena dataset; build one with :func:`arena_config` (it sets the name)."""
  min_digits: int = 1
  max_digits: int = 3
  ops: tuple[str, ...] = arithmetic.OPS
  test_fraction: float = 0.1
  pad: bool = True
  players: tuple[tuple[str, float], ...] = DEFAULT_PLAYERS
  worked: bool = True
  outcome_tag: bool | tuple[str, str] = False    # True: arithmetic.OUTCOME_TAGS; or (right, wrong)
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
            "test_fraction": self.test_fraction, "pad": self.pad, "players": [list(p) for p in self.players],
            "worked": self.worked,
            "outcome_tag": self.outcome_tag if isinstance(self.outcome_tag, bool)
                           else list(self.outcome_tag), "num_train": self.num_train,
            "num_test": self.num_test, "seed": self.seed}


PARAM_NAMES = ("min_digits", "max_digits", "ops", "test_fraction", "pad", "players", "worked",
               "outcome_tag", "num_train", "num_test", "seed")


def normalize_players(players) -> tuple[tuple[str, float], ...]:
  """Canonical ``((spec, weight), ...)`` from a spec, a list of specs / pairs, or a dict.

  >>> normalize_players("slip:5e-2")
  (('slip:0.05', 1.0),)
  >>> normalize_players({"perfect": 1, "drop_carry:0": 3})
  (('perfect', 1.0), ('drop_carry:0', 3.0))
  """
  if isinstance(players, str):
    players = [players]
  elif isinstance(players, Mapping):
    players = list(players.items())
  out = []
  for item in players:
    spec, weight = (item, 1.0) if isinstance(item, str) else item
    weight = float(weight)
    if not (np.isfinite(weight) and weight >= 0):
      raise DataError(f"arena player {spec!r} has weight {weight}; weights must be finite, >= 0")
    out.append((arithmetic.parse_player(spec).name, weight))
  if not out or sum(w for _, w in out) <= 0:
    raise DataError(f"arena players {players!r} need at least one player with a positive weight")
  return tuple(out)


def canonical_outcome_tag(outcome_tag) -> bool | tuple[str, str]:
  """False, True (the default tags) or a checked pair of texts (a ``DataError`` if bad).

  >>> canonical_outcome_tag(["W ", "L "]), canonical_outcome_tag(["right: ", "wrong: "])
  (True, ('right: ', 'wrong: '))
  """
  try:
    tags = arithmetic.outcome_tags(outcome_tag)
  except ValueError as e:
    raise DataError(f"arena.outcome_tag: {e}") from None
  if tags is None or tags == arithmetic.OUTCOME_TAGS:
    return tags is not None
  return tags


def arena_config(*, min_digits: int = 1, max_digits: int = 3, ops: Sequence[str] = arithmetic.OPS,
                 test_fraction: float = 0.1, pad: bool = True, players=DEFAULT_PLAYERS, worked: bool = True,
                 outcome_tag=False, num_train: int = 20_000, num_test: int = 500,
                 seed: int = 0) -> ArenaBuilderConfig:
  """A validated :class:`ArenaBuilderConfig`, named ``<ops>_d<lo>-<hi>_<style>[_tagged]_<hash>``.

  >>> arena_config(ops="+", max_digits=2, worked=False).name.startswith("add_d1-2_answer_")
  True
  """
  arena = arithmetic.ArenaConfig(min_digits=int(min_digits), max_digits=int(max_digits),
                                 ops=tuple(ops), test_fraction=float(test_fraction), pad=bool(pad))
  players = normalize_players(players)
  outcome_tag = canonical_outcome_tag(outcome_tag)
  if int(num_train) < 1 or int(num_test) < 0:
    raise DataError(f"arena needs num_train >= 1 and num_test >= 0, got num_train={num_train}, "
                     f"num_test={num_test}")
  cfg = ArenaBuilderConfig(
      name="pending", min_digits=arena.min_digits, max_digits=arena.max_digits, ops=arena.ops,
      test_fraction=arena.test_fraction, pad=arena.pad, players=players, worked=bool(worked),
      outcome_tag=outcome_tag, num_train=int(num_train), num_test=int(num_test),
      seed=int(seed))
  params_json = json.dumps(cfg.params(), sort_keys=True)
  digest = hashlib.sha256(params_json.encode("utf-8")).hexdigest()[:10]
  ops_name = "-".join(_OP_NAMES[op] for op in arena.ops)
  style = "worked" if cfg.worked else "answer"
  tag = "_tagged" if cfg.outcome_tag else ""
  cfg.name = f"{ops_name}_d{arena.min_digits}-{arena.max_digits}_{style}{tag}_{digest}"
  cfg.description = params_json
  return cfg


class ArithmeticArena(tfds.core.GeneratorBasedBuilder):
  """Arithmetic-arena transcripts; construct with ``config=arena_config(...)``."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "Zero-padded operands (pad=True)."}
  # Nothing is downloaded, so there are no URL checksums to look up next to the code; TFDS's own
  # lookup of the code path needs the optional `importlib_resources` package.
  code_path = None

  def __init__(self, *, config: ArenaBuilderConfig, data_dir: str, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, data_dir=data_dir, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Arithmetic arena transcripts (gamejax.games.arithmetic.generate_examples).",
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "players": tfds.features.Tensor(shape=(None,), dtype=np.int8),
            "outcome": tfds.features.Scalar(dtype=np.int32),
            "a": tfds.features.Scalar(dtype=np.int64),
            "b": tfds.features.Scalar(dtype=np.int64),
            "op": tfds.features.Text(),
            "answer": tfds.features.Scalar(dtype=np.int64),
            "player": tfds.features.Text(),
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
    cfg = self.builder_config
    for key, ex in arithmetic.generate_examples(
        cfg.arena, split, num_examples, cfg.seed, list(cfg.players), cfg.worked, cfg.outcome_tag):
      yield key, {
          "tokens": np.asarray(ex["tokens"], np.int32),
          "players": np.asarray(ex["players"], np.int8),
          "outcome": np.int32(ex["outcome"]), "a": np.int64(ex["a"]), "b": np.int64(ex["b"]),
          "op": str(ex["op"]), "answer": np.int64(ex["answer"]), "player": str(ex["player"])}
