"""TFDS builder for a user's own folder of ``.txt`` and ``.jsonl`` files.

Records (searched recursively, files in sorted order):

* ``.txt``: the whole file is one record, or with ``split_paragraphs`` each blank-line-separated
  paragraph is. Plain text is data moved by both players, so ``BOS + text + EOS`` is all OPPONENT.
* ``.jsonl``: each non-blank line is ``{"text": ...}`` (``BOS + text + EOS``, all OPPONENT),
  ``{"prompt": ..., "response": ...}`` (``BOS + prompt`` OPPONENT, ``response + EOS`` AGENT) or a
  chat ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`` with at least
  one assistant turn: each assistant turn's content and the template text that closes it are
  AGENT, the rest (system and user turns, role headers, generation prompts) OPPONENT; see
  ``Tokenizer.encode_chat`` in :mod:`gamejax.data.tokenizer`.

``tokenizer`` is a :func:`~gamejax.data.tokenizer.load_tokenizer` spec: ``"byte"`` (the default) or
``"hf:DIR"``, a Hugging Face tokenizer whose chat template renders the chats. BOS starts a record
only where the tokenizer adds one (the byte tokenizer does; an HF one when its config says
``add_bos_token``); chats get no BOS or EOS beyond what the template writes (byte: BOS, and EOS
after each assistant turn).

The config name hashes the folder path, the parameters and every file's name, size and mtime (and,
for an ``hf:`` tokenizer, its folder and the content of its files), so editing the folder or the
tokenizer builds a new dataset. The "test" split holds ``test_count`` records (or, when
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
from gamejax.data.tokenizer import ByteTokenizer, Tokenizer, TokenizerError, load_tokenizer
from gamejax.records import AGENT, OPPONENT

SUFFIXES = (".txt", ".jsonl")
_FORMAT_VERSION = 1  # bump when the record format changes, so old builds are not reused
_TOKENIZER = ByteTokenizer()
ROLES = ("system", "user", "assistant")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class LocalTextError(DataError):
  """A problem with the user's text folder (missing, empty, or a malformed file/line)."""


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """Folder and options; build one with :func:`local_text_config` (it sets the name)."""
  path: str = ""
  split_paragraphs: bool = False
  test_fraction: float = 0.1
  test_count: int | None = None
  tokenizer: str = "byte"


PARAM_NAMES = ("path", "split_paragraphs", "test_fraction", "test_count", "tokenizer")


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


def tokenizer_fingerprint(spec: str) -> tuple[str, dict | None]:
  """``(canonical spec, what of it enters the config hash)``: None for ``"byte"`` (so byte-level
  dataset names stay as they were), else the tokenizer folder and its files' content hashes. The
  tokenizer is loaded once here, so a bad spec or folder fails before any building."""
  load_tokenizer(spec)  # raises on an unknown spec or an unusable folder
  if spec == "byte":
    return spec, None
  folder = os.path.realpath(os.path.expanduser(spec[len("hf:"):]))
  files = {}
  for name in TOKENIZER_FILES:
    full = os.path.join(folder, name)
    if os.path.isfile(full):
      with open(full, "rb") as f:
        files[name] = hashlib.sha256(f.read()).hexdigest()
  return f"hf:{folder}", {"tokenizer": f"hf:{folder}", "tokenizer_files": files}


def local_text_config(path: str, *, split_paragraphs: bool = False,
                      test_fraction: float = 0.1, test_count: int | None = None,
                      tokenizer: str = "byte") -> LocalTextConfig:
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
  tokenizer, tokenizer_hashed = tokenizer_fingerprint(tokenizer)
  fingerprint = json.dumps({"path": path, "split_paragraphs": bool(split_paragraphs),
                            "test_fraction": float(test_fraction), "test_count": test_count,
                            "files": files,
                            "format": _FORMAT_VERSION, **(tokenizer_hashed or {})}, sort_keys=True)
  digest = hashlib.sha256(fingerprint.encode("utf-8")).hexdigest()[:10]
  prefix = re.sub(r"[^a-z0-9]+", "_", os.path.basename(path).lower()).strip("_")[:40] or "folder"
  return LocalTextConfig(name=f"{prefix}_{digest}", description=f"text files under {path}",
                         path=path, split_paragraphs=bool(split_paragraphs),
                         test_fraction=float(test_fraction), test_count=test_count,
                         tokenizer=tokenizer)


def _players(is_agent: np.ndarray) -> np.ndarray:
  return np.where(is_agent, AGENT, OPPONENT).astype(np.int8)


def _bos(tok: Tokenizer) -> list[int]:
  return [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []


def text_record(text: str, tok: Tokenizer = _TOKENIZER) -> tuple[np.ndarray, np.ndarray]:
  """``BOS + text + EOS``, all moved by OPPONENT (BOS only where ``tok.add_bos``).

  >>> text_record("hi")[0].tolist(), text_record("hi")[1].tolist()
  ([1, 107, 108, 2], [2, 2, 2, 2])
  """
  tokens = np.concatenate([_bos(tok), tok.encode(text), [tok.eos_id]]).astype(np.int32)
  return tokens, np.full(tokens.shape, OPPONENT, np.int8)


def prompt_response_record(prompt: str, response: str,
                           tok: Tokenizer = _TOKENIZER) -> tuple[np.ndarray, np.ndarray]:
  """``BOS + prompt`` by OPPONENT, then ``response + EOS`` by AGENT (BOS only where
  ``tok.add_bos``).

  >>> prompt_response_record("a", "b")[1].tolist()
  [2, 2, 1, 1]
  """
  move_o = np.concatenate([_bos(tok), tok.encode(prompt)]).astype(np.int32)
  move_a = np.concatenate([tok.encode(response), [tok.eos_id]]).astype(np.int32)
  players = np.concatenate([np.full(len(move_o), OPPONENT, np.int8),
                            np.full(len(move_a), AGENT, np.int8)])
  return np.concatenate([move_o, move_a]), players


def chat_messages(value, shown: str) -> list[dict]:
  """The ``messages`` of a chat line, checked: a non-empty list of ``{"role", "content"}`` with a
  known role and at least one assistant turn. ``shown`` ("file line N") starts every error."""
  if not isinstance(value, list) or not value:
    raise LocalTextError(f'{shown}: "messages" must be a non-empty list of '
                         f'{{"role": ..., "content": str}} objects, got {json.dumps(value)[:80]}')
  for j, m in enumerate(value):
    if not (isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)):
      raise LocalTextError(f'{shown}: message {j} must be {{"role": str, "content": str}}, '
                           f"got {json.dumps(m)[:80]}")
    if m["role"] not in ROLES:
      raise LocalTextError(f"{shown}: message {j} has unknown role {m['role']!r}; expected one of "
                           f"{', '.join(ROLES)}")
  if not any(m["role"] == "assistant" for m in value):
    raise LocalTextError(f"{shown}: no assistant message, so the agent moves nothing")
  return [{"role": m["role"], "content": m["content"]} for m in value]


def chat_record(messages: list[dict], tok: Tokenizer = _TOKENIZER,
                shown: str = "chat") -> tuple[np.ndarray, np.ndarray]:
  """The chat as ``tok.encode_chat`` cuts it: assistant turns (with their closing text) AGENT,
  the rest OPPONENT. A template that cannot render it is an error naming ``shown``.

  >>> chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
  >>> chat_record(chat)[1].tolist()  # BOS a | b EOS
  [2, 2, 1, 1]
  """
  try:
    tokens, is_agent = tok.encode_chat(messages)
  except TokenizerError as e:
    raise LocalTextError(f"{shown}: {e}") from None
  return np.asarray(tokens, np.int32), _players(is_agent)


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


def _jsonl_records(text: str, shown: str,
                   tok: Tokenizer = _TOKENIZER) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  for number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    where = f"{shown} line {number}"
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise LocalTextError(f"{where}: not valid JSON ({e.msg})") from None
    if isinstance(obj, dict) and "messages" in obj:
      yield (number, *chat_record(chat_messages(obj["messages"], where), tok, where))
    elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(
        obj.get("response"), str):
      yield (number, *prompt_response_record(obj["prompt"], obj["response"], tok))
    elif isinstance(obj, dict) and isinstance(obj.get("text"), str):
      yield (number, *text_record(obj["text"], tok))
    else:
      raise LocalTextError(f'{where}: expected an object {{"text": str}}, '
                           f'{{"prompt": str, "response": str}} or {{"messages": [...]}}, '
                           f"got {line.strip()[:80]!r}")


def read_records(path: str, split_paragraphs: bool = False,
                 tokenizer: str = "byte") -> list[tuple[str, dict]]:
  """All ``(key "file:line", example)`` records of the folder, in file order."""
  tok = load_tokenizer(tokenizer)
  records = []
  for rel in list_files(path):
    full = os.path.join(path, rel)
    text = _read_text(full)
    if rel.endswith(".jsonl"):
      items = _jsonl_records(text, full, tok)
    elif split_paragraphs:
      items = ((n, *text_record(p, tok)) for n, p in _paragraphs(text))
    else:
      items = [(1, *text_record(text, tok))] if text.strip() else []
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
    train, test = split_records(read_records(cfg.path, cfg.split_paragraphs, cfg.tokenizer),
                                cfg.test_fraction, cfg.test_count)
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
