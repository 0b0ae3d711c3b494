"""TFDS builder for a user's own folder of ``.txt`` and ``.jsonl`` files.

Records (searched recursively, files in sorted order):

* ``.txt``: the whole file is one record, or with ``split_paragraphs`` each blank-line-separated
  paragraph is. Plain text is data moved by both players, so ``BOS + text + EOS`` is all OPPONENT.
* ``.jsonl``: each non-blank line is ``{"text": ...}`` (``BOS + text + EOS``, all OPPONENT) or
  ``{"prompt": ..., "response": ...}`` (``BOS + prompt`` OPPONENT, ``response + EOS`` AGENT).

The config name hashes the folder path, the parameters and every file's name, size and mtime, so
editing the folder builds a new dataset. The "test" split holds ``test_count`` records (or, when
that is None, ``round(test_fraction * N)``) chosen by a stable hash of their ``file:line`` keys,
never all of them (left out when that is 0); training never reads it, and each stage that imitates
these records reports its held-out loss and perplexity on it.

>>> cfg = local_text_config("/path/to/my_notes", split_paragraphs=True)  # doctest: +SKIP
>>> builder = LocalText(config=cfg, data_dir="/tmp/gamejax_data")  # doctest: +SKIP
>>> builder.download_and_prepare()  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import zlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from gamejax.data.errors import DataError
from gamejax.data.tokenizer import BOS, EOS, ByteTokenizer
from gamejax.records import AGENT, OPPONENT

SUFFIXES = (".txt", ".jsonl")
_FORMAT_VERSION = 1  # bump when the record format changes, so old builds are not reused
_TOKENIZER = ByteTokenizer()


class LocalTextError(DataError):
  """A problem with the user's text folder (missing, empty, or a malformed file/line)."""


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """Folder and options; build one with :func:`local_text_config` (it sets the name)."""
  path: str = ""
  split_paragraphs: bool = False
  test_fraction: float = 0.1
  test_count: int | None = None


PARAM_NAMES = ("path", "split_paragraphs", "test_fraction", "test_count")


def list_files(path: str) -> list[str]:
  """Sorted ``.txt``/``.jsonl`` paths (relative to ``path``) under folder ``path``, recursively."""
  if not os.path.isdir(path):
    what = "is not a folder" if os.path.exists(path) else "does not exist"
    raise LocalTextError(f"local_text folder {path!r} {what}")
  found = []
  for root, dirs, files in os.walk(path):
    dirs.sort()
    for f in files:
      if f.endswith(SUFFIXES) and not f.startswith("."):
        found.append(os.path.relpath(os.path.join(root, f), path))
  if not found:
    raise LocalTextError(f"local_text folder {path!r} has no {' or '.join(SUFFIXES)} files")
  return sorted(found)


def local_text_config(path: str, *, split_paragraphs: bool = False,
                      test_fraction: float = 0.1, test_count: int | None = None) -> LocalTextConfig:
  """Validated :class:`LocalTextConfig` named ``<folder>_<hash of path, options and files>``."""
  path = os.path.realpath(os.path.expanduser(os.fspath(path)))
  if not 0.0 <= float(test_fraction) < 1.0:
    raise LocalTextError(f"local_text test_fraction={test_fraction} is not in [0, 1)")
  if test_count is not None and (isinstance(test_count, bool) or not isinstance(test_count, int)
                                 or test_count < 0):
    raise LocalTextError(f"local_text test_count={test_count!r} must be None or an int >= 0")
  files = []
  for rel in list_files(path):
    st = os.stat(os.path.join(path, rel))
    files.append([rel, st.st_size, st.st_mtime_ns])
  fingerprint = json.dumps({"path": path, "split_paragraphs": bool(split_paragraphs),
                            "test_fraction": float(test_fraction), "test_count": test_count,
                            "files": files,
                            "format": _FORMAT_VERSION}, sort_keys=True)
  digest = hashlib.sha256(fingerprint.encode("utf-8")).hexdigest()[:10]
  prefix = re.sub(r"[^a-z0-9]+", "_", os.path.basename(path).lower()).strip("_")[:40] or "folder"
  return LocalTextConfig(name=f"{prefix}_{digest}", description=f"text files under {path}",
                         path=path, split_paragraphs=bool(split_paragraphs),
                         test_fraction=float(test_fraction), test_count=test_count)


def text_record(text: str) -> tuple[np.ndarray, np.ndarray]:
  """``BOS + text + EOS``, all moved by OPPONENT.

  >>> text_record("hi")[0].tolist(), text_record("hi")[1].tolist()
  ([1, 107, 108, 2], [2, 2, 2, 2])
  """
  tokens = np.concatenate([[BOS], _TOKENIZER.encode(text), [EOS]]).astype(np.int32)
  return tokens, np.full(tokens.shape, OPPONENT, np.int8)


def prompt_response_record(prompt: str, response: str) -> tuple[np.ndarray, np.ndarray]:
  """``BOS + prompt`` by OPPONENT, then ``response + EOS`` by AGENT.

  >>> prompt_response_record("a", "b")[1].tolist()
  [2, 2, 1, 1]
  """
  move_o = np.concatenate([[BOS], _TOKENIZER.encode(prompt)]).astype(np.int32)
  move_a = np.concatenate([_TOKENIZER.encode(response), [EOS]]).astype(np.int32)
  players = np.concatenate([np.full(len(move_o), OPPONENT, np.int8),
                            np.full(len(move_a), AGENT, np.int8)])
  return np.concatenate([move_o, move_a]), players


def _read_text(full: str) -> str:
  try:
    with open(full, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError as e:
    raise LocalTextError(f"{full}: not valid UTF-8 ({e})") from None


def _paragraphs(text: str) -> Iterator[tuple[int, str]]:
  """``(first line number (1-based), paragraph)`` for blank-line-separated paragraphs."""
  start, lines = 0, []
  for number, line in enumerate(text.splitlines(), start=1):
    if line.strip():
      if not lines:
        start = number
      lines.append(line)
    elif lines:
      yield start, "\n".join(lines)
      lines = []
  if lines:
    yield start, "\n".join(lines)


def _jsonl_records(text: str, shown: str) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise LocalTextError(f"{shown} line {number}: not valid JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(
        obj.get("response"), str):
      yield (number, *prompt_response_record(obj["prompt"], obj["response"]))
    elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
      yield (number, *text_record(obj["text"]))
    else:
      raise LocalTextError(f'{shown} line {number}: expected an object {{"text": str}} or '
                           f'{{"prompt": str, "response": str}}, got {line.strip()[:80]!r}')


def read_records(path: str, split_paragraphs: bool = False) -> list[tuple[str, dict]]:
  """All ``(key "file:line", example)`` records of the folder, in file order."""
  records = []
  for rel in list_files(path):
    full = os.path.join(path, rel)
    text = _read_text(full)
    if rel.endswith(".jsonl"):
      items = _jsonl_records(text, full)
    elif split_paragraphs:
      items = ((n, *text_record(p)) for n, p in _paragraphs(text))
    else:
      items = [(1, *text_record(text))] if text.strip() else []
    for line, tokens, players in items:
      records.append((f"{rel}:{line}", {"tokens": tokens, "players": players, "file": rel,
                                        "line": np.int32(line)}))
  if not records:
    raise LocalTextError(f"local_text folder {path!r} has no usable records (all files are empty)")
  return records


def split_records(records: list[tuple[str, dict]], test_fraction: float,
                  test_count: int | None = None):
  """``(train, test)``: the ``test_count`` (None: ``round(test_fraction * N)``) records of smallest
  key hash are test."""
  n_test = int(round(test_fraction * len(records))) if test_count is None else int(test_count)
  ranked = sorted(range(len(records)),
                  key=lambda i: (zlib.crc32(records[i][0].encode("utf-8")), records[i][0]))
  test_ids = set(ranked[:n_test])
  train = [r for i, r in enumerate(records) if i not in test_ids]
  test = [r for i, r in enumerate(records) if i in test_ids]
  return train, test


class LocalText(tfds.core.GeneratorBasedBuilder):
  """A folder of ``.txt``/``.jsonl`` files; construct with ``config=local_text_config(path)``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # Nothing is downloaded, so there are no URL checksums to look up next to the code; TFDS's own
  # lookup of the code path needs the optional `importlib_resources` package.
  code_path = None

  def __init__(self, *, config: LocalTextConfig, data_dir: str, **kwargs):
    kwargs.setdefault("file_format", "array_record")
    super().__init__(config=config, data_dir=data_dir, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Records from a local folder of .txt / .jsonl files.",
        features=tfds.features.FeaturesDict({
            "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "players": tfds.features.Tensor(shape=(None,), dtype=np.int8),
            "file": tfds.features.Text(),
            "line": tfds.features.Scalar(dtype=np.int32),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    train, test = split_records(read_records(cfg.path, cfg.split_paragraphs), cfg.test_fraction,
                                cfg.test_count)
    if not train:
      raise LocalTextError(f"local_text folder {cfg.path!r}: no records left for the train split "
                           f"(test_fraction={cfg.test_fraction}, test_count={cfg.test_count}, "
                           f"{len(test)} held out)")
    splits = {"train": self._generate_examples(train)}
    if test:
      splits["test"] = self._generate_examples(test)
    return splits

  def _generate_examples(self, records):
    yield from records
