"""Named, random-access data sources backed by TFDS array_record files.

``load_source(name, split, data_dir, **params)`` builds the dataset once under ``data_dir`` (TFDS
``download_and_prepare``; later calls with the same parameters reuse the files) and returns a
:class:`Source`: ``len(source)``, ``source[i]`` and ``source.__getitems__(indices)`` give example
dicts (text features decoded to ``str``) with at least "tokens" and "players".

>>> src = load_source("arithmetic_arena", "train", "/tmp/gamejax_data",
...                   max_digits=2, num_train=1000, num_test=50)  # doctest: +SKIP
>>> src[0]["tokens"].dtype, len(src)  # doctest: +SKIP
(dtype('int32'), 1000)
"""
from __future__ import annotations

import contextlib
import difflib
import io
import logging
import os
import re
import tempfile
from typing import Any, Callable, Sequence

from absl import logging as absl_logging
import numpy as np
import tensorflow_datasets as tfds

from gamejax.data import arena, local_text, preferences
from gamejax.data.errors import DataError

tfds.disable_progress_bar()
_LOG = logging.getLogger(__name__)
DATA_DIR_ENV = "GAMEJAX_DATA_DIR"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "gamejax", "datasets")
LENGTHS_CHUNK = 4096  # examples read at once while counting a split's lengths


def _arena_builder(data_dir: str, params: dict) -> tfds.core.DatasetBuilder:
  return arena.ArithmeticArena(config=arena.arena_config(**params), data_dir=data_dir)


def _preferences_builder(data_dir: str, params: dict) -> tfds.core.DatasetBuilder:
  return preferences.ArenaPreferences(config=preferences.preferences_config(**params),
                                      data_dir=data_dir)


def _local_text_builder(data_dir: str, params: dict) -> tfds.core.DatasetBuilder:
  if "path" not in params:
    raise DataError("source 'local_text' needs path=<folder of .txt/.jsonl files>")
  params = dict(params)
  return local_text.LocalText(config=local_text.local_text_config(params.pop("path"), **params),
                              data_dir=data_dir)


# name -> (builder factory, accepted parameter names)
SOURCES: dict[str, tuple[Callable[[str, dict], tfds.core.DatasetBuilder], Sequence[str]]] = {
    "arithmetic_arena": (_arena_builder, arena.PARAM_NAMES),
    "local_text": (_local_text_builder, local_text.PARAM_NAMES),
    "arena_preferences": (_preferences_builder, preferences.PARAM_NAMES),
}


def _unknown(kind: str, name: str, known: Sequence[str]) -> ValueError:
  close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
  hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
  return DataError(f"unknown {kind} {name!r}{hint} (known: {', '.join(sorted(known))})")


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
  """``data_dir``, else ``$GAMEJAX_DATA_DIR``, else ``~/.cache/gamejax/datasets`` (expanded)."""
  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


@contextlib.contextmanager
def _quiet():
  """Silences TFDS chatter: its stdout banners and absl INFO/WARNING logs."""
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logging.set_verbosity(verbosity)


def prepare_builder(name: str, data_dir: str | os.PathLike | None = None,
                    **params: Any) -> tfds.core.DatasetBuilder:
  """The TFDS builder of source ``name`` with its files built (only the first time)."""
  if name not in SOURCES:
    raise _unknown("data source", name, list(SOURCES))
  factory, accepted = SOURCES[name]
  for key in params:
    if key not in accepted:
      raise _unknown(f"parameter of data source {name!r}:", key, list(accepted))
  data_dir = resolve_data_dir(data_dir)
  with _quiet():
    builder = factory(data_dir, params)
    if not builder.is_prepared():
      _LOG.info("building data source %s (%s) in %s", name, builder.builder_config.name,
                builder.data_dir)
      builder.download_and_prepare()
  return builder


def _decode(example: dict) -> dict:
  return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in example.items()}


def _read_lengths(path: str, num: int) -> np.ndarray | None:
  """The lengths kept at ``path`` when they are there and fit ``num`` examples."""
  try:
    out = np.load(path)
  except (OSError, ValueError):
    return None
  return out if out.shape == (num,) else None


def _write_lengths(path: str, lengths: np.ndarray) -> None:
  """Keeps ``lengths`` at ``path`` (written whole, then renamed); a read-only data dir keeps
  nothing, and the lengths are read again next time."""
  folder, temp = os.path.dirname(path), None
  try:
    os.makedirs(folder, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=folder, suffix=".npy")
    with os.fdopen(fd, "wb") as f:
      np.save(f, lengths)
    os.replace(temp, path)
  except OSError as e:
    if temp is not None and os.path.exists(temp):
      os.remove(temp)
    _LOG.warning("could not keep the example lengths at %s: %s", path, e)


class Source:
  """Random access to one split: ``len``, ``[i]`` and bulk ``__getitems__`` -> example dicts."""

  def __init__(self, data_source, name: str, split: str, builder: tfds.core.DatasetBuilder):
    self._data = data_source
    self.name, self.split, self.builder = name, split, builder
    self._lengths: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self._data)

  def __getitem__(self, index: int) -> dict:
    n = len(self._data)
    if not -n <= index < n:
      raise IndexError(f"index {index} out of range for {self!r} of {n} examples")
    return _decode(self._data[index % n])

  def __getitems__(self, indices: Sequence[int]) -> list[dict]:
    return [_decode(ex) for ex in self._data.__getitems__([int(i) for i in indices])]

  def lengths(self) -> np.ndarray:
    """Tokens in each example, ``int32[len(self)]``: read once from every example and kept in
    ``<builder data dir>/lengths/<split>.npy``, so that a packed loader plans its batches without
    decoding examples and each process reads only its rows' examples."""
    if self._lengths is None:
      path = os.path.join(self.builder.data_dir, "lengths",
                          re.sub(r"[^A-Za-z0-9_.%-]+", "_", self.split) + ".npy")
      self._lengths = _read_lengths(path, len(self))
      if self._lengths is None:
        self._lengths = np.asarray(
            [len(ex["tokens"]) for start in range(0, len(self), LENGTHS_CHUNK)
             for ex in self._data.__getitems__(
                 list(range(start, min(start + LENGTHS_CHUNK, len(self)))))], np.int32)
        _write_lengths(path, self._lengths)
    return self._lengths

  def __repr__(self) -> str:
    config = self.builder.builder_config.name
    return f"Source({self.name!r}, split={self.split!r}, config={config!r})"


def has_split(name: str, split: str, data_dir: str | os.PathLike | None = None,
              **params: Any) -> bool:
  """Whether source ``name`` (built with ``params``, once) has split ``split``."""
  return split in prepare_builder(name, data_dir, **params).info.splits.keys()


def load_source(name: str, split: str = "train", data_dir: str | os.PathLike | None = None,
                **params: Any) -> Source:
  """Random-access split ``split`` of data source ``name`` ("arithmetic_arena" or "local_text").

  ``params`` are the source's parameters (see ``arena.arena_config`` and
  ``local_text.local_text_config``); the files are built under ``data_dir`` once and reused.

  >>> load_source("arithmetic_arena", "train", "/tmp/d", num_train=100).name  # doctest: +SKIP
  'arithmetic_arena'
  """
  builder = prepare_builder(name, data_dir, **params)
  splits = list(builder.info.splits.keys())
  if split.split("[")[0] not in splits:
    raise DataError(f"data source {name!r} ({builder.builder_config.name}) has no split "
                     f"{split!r}; available: {splits}")
  with _quiet():
    data = builder.as_data_source(split=split)
  return Source(data, name, split, builder)
