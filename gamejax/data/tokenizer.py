"""Tokenizers: the byte tokenizer of the small models, and Hugging Face ones with chat templates.

Every tokenizer follows the :class:`Tokenizer` protocol; :func:`load_tokenizer` builds one from a
spec, ``"byte"`` or ``"hf:DIR"`` (a folder with ``tokenizer.json``, as ``save_pretrained`` writes).

The byte tokenizer needs no vocabulary files and every UTF-8 string round-trips. Ids: 0 = PAD,
1 = BOS, 2 = EOS, byte ``b`` -> ``b + 3``; ``VOCAB_SIZE`` = 259 (models round up).

>>> tok = ByteTokenizer()
>>> tok.decode(tok.encode("12+3="))
'12+3='

A chat is a list of ``{"role": ..., "content": ...}`` messages. ``chat_segments`` cuts its rendered
text into pieces, each moved either by the assistant (``True``: the turn's content and the template
text that closes it) or by the other side (the system and user turns and all framing, the
generation prompt included); ``encode_chat`` tokenizes the pieces one by one.

>>> chat = [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]
>>> tok.chat_segments(chat)
[('2+2=', False), ('4', True)]
>>> ids, is_agent = tok.encode_chat(chat)
>>> ids.tolist(), is_agent.astype(int).tolist()
([1, 53, 46, 53, 64, 55, 2], [0, 0, 0, 0, 0, 1, 1])
"""
from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

from gamejax.data.errors import DataError

PAD, BOS, EOS = 0, 1, 2
OFFSET = 3
VOCAB_SIZE = 256 + OFFSET

Message = Mapping[str, Any]
SPEC_FORMS = "'byte' or 'hf:DIR' (a folder with tokenizer.json)"


class TokenizerError(DataError):
  """A tokenizer folder or chat template that cannot be used; the message names the file."""


@runtime_checkable
class Tokenizer(Protocol):
  """What gamejax needs of a tokenizer.

  ``encode`` adds no special tokens; ``decode`` drops them (and ids outside the vocabulary);
  ``add_bos`` says whether a document starts with ``bos_id``; EOS ends a move.
  """
  pad_id: int
  bos_id: int | None
  eos_id: int
  vocab_size: int
  add_bos: bool

  def encode(self, text: str) -> np.ndarray: ...
  def decode(self, ids) -> str: ...
  def decode_until_eos(self, ids) -> str: ...
  def token_texts(self) -> list[str]: ...
  def apply_chat_template(self, messages: Sequence[Message],
                          add_generation_prompt: bool = False) -> str: ...
  def chat_segments(self, messages: Sequence[Message]) -> list[tuple[str, bool]]: ...
  def encode_chat(self, messages: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]: ...


def _ids(ids) -> list[int]:
  return [int(i) for i in np.asarray(ids).reshape(-1)]


def _until(ids: list[int], stop: int | None) -> list[int]:
  return ids[:ids.index(stop)] if stop is not None and stop in ids else ids


def _segments_to_ids(tok: Tokenizer,
                     segments: Sequence[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
  """``(int32[N], bool[N])``: each segment encoded on its own, the pieces joined."""
  parts, agent = [np.zeros(0, np.int32)], [np.zeros(0, bool)]
  for text, is_agent in segments:
    ids = np.asarray(tok.encode(text), np.int32)
    parts.append(ids)
    agent.append(np.full(len(ids), bool(is_agent)))
  return np.concatenate(parts), np.concatenate(agent)


class ByteTokenizer:
  """UTF-8 bytes shifted by ``OFFSET``; PAD, BOS and EOS below them.

  Chats have no role markers: BOS, then each message's content in order, each assistant message
  followed by EOS (EOS ends a move for the byte models). ``apply_chat_template`` is the text of
  that (the contents, joined); the generation prompt is empty.
  """
  pad_id, bos_id, eos_id, vocab_size = PAD, BOS, EOS, VOCAB_SIZE
  add_bos = True

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + OFFSET

  def decode(self, ids) -> str:
    data = bytes(i - OFFSET for i in _ids(ids) if OFFSET <= i < VOCAB_SIZE)
    return data.decode("utf-8", errors="replace")

  def decode_until_eos(self, ids) -> str:
    return self.decode(_until(_ids(ids), EOS))

  def token_texts(self) -> list[str]:
    """The text of each id alone: ``<pad>``, ``<bos>``, ``<eos>``, then each byte (U+FFFD when
    it is not UTF-8 by itself).

    >>> ByteTokenizer().token_texts()[OFFSET + ord("a")]
    'a'
    """
    return ["<pad>", "<bos>", "<eos>"] + [bytes([b]).decode("utf-8", errors="replace")
                                           for b in range(256)]

  def apply_chat_template(self, messages: Sequence[Message],
                          add_generation_prompt: bool = False) -> str:
    del add_generation_prompt  # no role markers, so nothing prompts a reply
    return "".join(str(m["content"]) for m in messages)

  def chat_segments(self, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    return [(str(m["content"]), m["role"] == "assistant") for m in messages]

  def encode_chat(self, messages: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]:
    """``BOS`` + each content; an assistant content and the EOS after it are the agent's."""
    segments = self.chat_segments(messages)
    parts, agent = [np.array([BOS], np.int32)], [np.zeros(1, bool)]
    for text, is_agent in segments:
      ids = self.encode(text)
      if is_agent:
        ids = np.concatenate([ids, [EOS]]).astype(np.int32)
      parts.append(ids)
      agent.append(np.full(len(ids), is_agent))
    return np.concatenate(parts), np.concatenate(agent)


# ----------------------------------------------------------------------------------------------
# Chat templates, rendered as transformers renders them (transformers/utils/chat_template_utils.py).

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


def compile_chat_template(source: str, shown: str):
  """A jinja2 template in transformers' sandbox: ``trim_blocks``, ``lstrip_blocks``,
  ``loopcontrols``, ``{% generation %}`` blocks (rendered as their body), ``raise_exception``,
  ``strftime_now`` and a ``tojson`` that does not escape HTML. ``shown`` names the template's file
  in errors.

  >>> t = compile_chat_template("{% for m in messages %}{{ m.content | tojson }}{% endfor %}", "t")
  >>> t.render(messages=[{"content": "<b>"}, {"content": "&"}])
  '"<b>""&"'
  """
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(jinja2.ext.Extension):
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  class TemplateDict:  # `dict(...)` without the class's attributes to climb through
    def __call__(self, *args, **kwargs):
      return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
      return dict.fromkeys(*args, **kwargs)

  class TemplateNamespace(jinja2.utils.Namespace):  # no underscore-prefixed names
    def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
      self, args = args[0], args[1:]
      attrs = dict(*args, **kwargs)
      for name in attrs:
        TemplateNamespace.check_name(name)
      jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
      TemplateNamespace.check_name(name)
      jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check_name(name):
      if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(
            f"chat templates cannot store underscore-prefixed attributes, got {name!r}")

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  env.globals["dict"] = TemplateDict()
  env.globals["namespace"] = TemplateNamespace
  try:
    return env.from_string(source)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise TokenizerError(f"{shown}: chat template line {e.lineno}: {e.message}") from None


def render_chat(template, shown: str, messages: Sequence[Message], add_generation_prompt: bool,
                special_tokens: Mapping[str, str]) -> str:
  """``template`` rendered with ``messages`` (keys whose value is None dropped, as transformers
  does), ``add_generation_prompt``, ``tools=None``, ``documents=None`` and the special tokens
  (``bos_token``, ``eos_token``, ...); a failure names ``shown``."""
  import jinja2
  messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
  try:
    return template.render(messages=messages, tools=None, documents=None,
                           add_generation_prompt=bool(add_generation_prompt), **special_tokens)
  except jinja2.exceptions.TemplateError as e:
    raise TokenizerError(f"{shown}: chat template failed to render: {e}") from None
  except Exception as e:  # a template's own bug: missing key, bad arithmetic, ...
    raise TokenizerError(f"{shown}: chat template failed to render: "
                         f"{type(e).__name__}: {e}") from None


def template_segments(render, messages: Sequence[Message]) -> list[tuple[str, bool]]:
  """Cuts ``render(messages, add_generation_prompt=False)`` into ``(text, is_agent)`` pieces.

  Assistant turn ``i`` is ``render(messages[:i+1])`` less ``render(messages[:i], True)`` (its
  content and closing text); everything else (other turns, role headers, the generation prompt)
  is not the agent's. Raises :class:`TokenizerError` when a template renders a prefix that the
  longer conversation does not begin with.

  >>> def render(ms, gen=False):
  ...   return "".join(f"<{m['role']}>{m['content']}|" for m in ms) + ("<assistant>" if gen else "")
  >>> template_segments(render, [{"role": "user", "content": "hi"},
  ...                            {"role": "assistant", "content": "yo"}])
  [('<user>hi|<assistant>', False), ('yo|', True)]
  """
  def not_prefix(head: str, what: str, full: str, whole: str) -> TokenizerError:
    at = next((k for k, (a, b) in enumerate(zip(head, full)) if a != b), len(full))
    return TokenizerError(
        f"chat template is not prefix-consistent: rendering {what} is not the beginning of "
        f"rendering {whole}; at character {at} the first has {head[at:at + 40]!r}, the second "
        f"{full[at:at + 40]!r}")

  segments: list[tuple[str, bool]] = []
  done, done_what = "", "nothing"
  for i, message in enumerate(messages):
    if message.get("role") != "assistant":
      continue
    head = render(messages[:i], True)
    full = render(messages[:i + 1], False)
    if not head.startswith(done):
      raise not_prefix(done, done_what, head, f"messages[:{i}] with the generation prompt")
    if not full.startswith(head):
      raise not_prefix(head, f"messages[:{i}] with the generation prompt", full,
                       f"messages[:{i + 1}]")
    segments += [(head[len(done):], False), (full[len(head):], True)]
    done, done_what = full, f"messages[:{i + 1}]"
  whole = render(messages, False)
  if not whole.startswith(done):
    raise not_prefix(done, done_what, whole, f"all {len(messages)} messages")
  segments.append((whole[len(done):], False))
  merged: list[tuple[str, bool]] = []
  for text, is_agent in segments:
    if not text:
      continue
    if merged and merged[-1][1] == is_agent:
      merged[-1] = (merged[-1][0] + text, is_agent)
    else:
      merged.append((text, is_agent))
  return merged


# ----------------------------------------------------------------------------------------------
# Hugging Face tokenizers.

def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise TokenizerError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
  except (OSError, UnicodeDecodeError) as e:
    raise TokenizerError(f"{path}: cannot be read ({e})") from None


def _token_content(value: Any, key: str, shown: str) -> str | None:
  """A special token as ``tokenizer_config.json`` gives it: a string or ``{"content": ...}``."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise TokenizerError(f'{shown}: "{key}" must be a string or {{"content": str}}, '
                       f"got {value!r}")


def _template_from_config(value: Any, shown: str) -> str | None:
  """``chat_template`` of ``tokenizer_config.json``: a string or ``[{"name", "template"}]``."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, list) and all(isinstance(t, dict) and "name" in t and "template" in t
                                     for t in value):
    named = {t["name"]: t["template"] for t in value}
    if "default" not in named:
      raise TokenizerError(f'{shown}: "chat_template" lists templates {sorted(named)} but no '
                           '"default"')
    return named["default"]
  raise TokenizerError(f'{shown}: "chat_template" must be a string or a list of '
                       f'{{"name", "template"}}, got {type(value).__name__}')


def _clean_up_spaces(text: str) -> str:
  """transformers' ``clean_up_tokenization`` (for WordPiece-style vocabularies)."""
  for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
               (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
    text = text.replace(a, b)
  return text


class HFTokenizer:
  """A ``tokenizers`` tokenizer with the special tokens and chat template of its
  ``tokenizer_config.json`` (and ``chat_template.jinja``, which wins, as in transformers).

  Encoding adds no special tokens and decoding skips them, like transformers'
  ``encode(text, add_special_tokens=False)`` and ``decode(ids, skip_special_tokens=True)``. Without
  a pad token ``pad_id`` is ``eos_id``; ``add_bos`` is the config's ``add_bos_token`` (False when
  absent); ``vocab_size`` counts the added tokens.

  >>> tok = HFTokenizer.from_dir("/path/to/tokenizer")  # doctest: +SKIP
  >>> chat = [{"role": "user", "content": "Hi"}]
  >>> tok.apply_chat_template(chat, add_generation_prompt=True)  # doctest: +SKIP
  '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
  """

  def __init__(self, backend, *, special_tokens: Mapping[str, str] | None = None,
               chat_template: str | None = None, add_bos: bool = False,
               clean_up_spaces: bool = False, name: str = "tokenizer",
               template_file: str | None = None):
    self._tok = backend
    self.name = name
    self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    ids = {}
    for key, content in self.special_tokens.items():
      ids[key] = backend.token_to_id(content)
      if ids[key] is None:
        raise TokenizerError(f"{name}: {key} {content!r} is not in the vocabulary")
    self.bos_id = ids.get("bos_token")
    self.eos_id = ids.get("eos_token")
    if self.eos_id is None:
      raise TokenizerError(f"{name}: no eos_token; gamejax needs one to end a move")
    self.pad_id = ids.get("pad_token", self.eos_id)
    self.add_bos = bool(add_bos) and self.bos_id is not None
    self.vocab_size = int(backend.get_vocab_size(with_added_tokens=True))
    self.chat_template = chat_template
    self._template_file = template_file or name
    self._compiled = None
    self._clean_up = bool(clean_up_spaces) and type(backend.model).__name__ != "BPE"
    self._texts: list[str] | None = None

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> "HFTokenizer":
    """Reads ``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` of the
    folder ``path`` (the last two optional)."""
    import tokenizers
    path = os.path.expanduser(os.fspath(path))
    if not os.path.isdir(path):
      what = "is not a folder" if os.path.exists(path) else "does not exist"
      raise TokenizerError(f"tokenizer folder {path!r} {what}")
    tok_file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(tok_file):
      raise TokenizerError(f"{tok_file}: no such file (a Hugging Face tokenizer folder needs "
                           "tokenizer.json, as save_pretrained writes it)")
    try:
      backend = tokenizers.Tokenizer.from_file(tok_file)
    except Exception as e:  # tokenizers raises its own Exception on bad files
      raise TokenizerError(f"{tok_file}: not a readable tokenizers file ({e})") from None
    cfg_file = os.path.join(path, "tokenizer_config.json")
    cfg = _read_json(cfg_file) if os.path.isfile(cfg_file) else {}
    if not isinstance(cfg, dict):
      raise TokenizerError(f"{cfg_file}: expected a JSON object, got {type(cfg).__name__}")
    special = {k: _token_content(cfg.get(k), k, cfg_file) for k in SPECIAL_TOKEN_NAMES}
    template, template_file = _template_from_config(cfg.get("chat_template"), cfg_file), cfg_file
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
      try:
        with open(jinja_file, encoding="utf-8") as f:
          template, template_file = f.read(), jinja_file
      except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{jinja_file}: cannot be read ({e})") from None
    return cls(backend, special_tokens=special, chat_template=template,
               add_bos=bool(cfg.get("add_bos_token", False)),
               clean_up_spaces=bool(cfg.get("clean_up_tokenization_spaces", False)),
               name=cfg_file if os.path.isfile(cfg_file) else tok_file,
               template_file=template_file)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    ids = [i for i in _ids(ids) if 0 <= i < self.vocab_size]
    text = self._tok.decode(ids, skip_special_tokens=True)
    return _clean_up_spaces(text) if self._clean_up else text

  def decode_until_eos(self, ids) -> str:
    return self.decode(_until(_ids(ids), self.eos_id))

  def token_texts(self) -> list[str]:
    """The text of each id decoded alone, special tokens included (computed once)."""
    if self._texts is None:
      self._texts = self._tok.decode_batch([[i] for i in range(self.vocab_size)],
                                           skip_special_tokens=False)
    return list(self._texts)

  def _template(self):
    if self.chat_template is None:
      raise TokenizerError(f"{self.name}: no chat template (neither a \"chat_template\" in "
                           "tokenizer_config.json nor a chat_template.jinja file)")
    if self._compiled is None:
      self._compiled = compile_chat_template(self.chat_template, self._template_file)
    return self._compiled

  def apply_chat_template(self, messages: Sequence[Message],
                          add_generation_prompt: bool = False) -> str:
    """The rendered chat text, as transformers' ``apply_chat_template(..., tokenize=False)``."""
    return render_chat(self._template(), self._template_file, messages, add_generation_prompt,
                       self.special_tokens)

  def chat_segments(self, messages: Sequence[Message]) -> list[tuple[str, bool]]:
    try:
      return template_segments(self.apply_chat_template, messages)
    except TokenizerError as e:
      if str(e).startswith(self._template_file):
        raise
      raise TokenizerError(f"{self._template_file}: {e}") from None

  def encode_chat(self, messages: Sequence[Message]) -> tuple[np.ndarray, np.ndarray]:
    """The chat segments encoded one by one (the template carries any BOS/EOS)."""
    return _segments_to_ids(self, self.chat_segments(messages))

  def encode_chat_prompt(self, messages: Sequence[Message]) -> np.ndarray:
    """The ids of the chat with the assistant's turn opened (the generation prompt), as
    transformers' ``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``."""
    return self.encode(self.apply_chat_template(messages, add_generation_prompt=True))


def load_tokenizer(spec: str) -> Tokenizer:
  """``"byte"`` -> :class:`ByteTokenizer`; ``"hf:DIR"`` -> :meth:`HFTokenizer.from_dir`.

  >>> load_tokenizer("byte").vocab_size
  259
  >>> load_tokenizer("gpt2")
  Traceback (most recent call last):
  ...
  ValueError: unknown tokenizer 'gpt2': expected 'byte' or 'hf:DIR' (a folder with tokenizer.json)
  """
  if spec == "byte":
    return ByteTokenizer()
  if isinstance(spec, str) and spec.startswith("hf:") and spec[3:]:
    return HFTokenizer.from_dir(spec[3:])
  raise ValueError(f"unknown tokenizer {spec!r}: expected {SPEC_FORMS}")


@functools.lru_cache(maxsize=8)
def cached_tokenizer(spec: str) -> Tokenizer:
  """``load_tokenizer(spec)``, loaded once per process."""
  return load_tokenizer(spec)
