"""Tokenizers (``gamejax.data.tokenizer``): a Hugging Face tokenizer folder read without
transformers, checked against transformers' own ``AutoTokenizer`` on the same folder: encoding,
decoding and chat templates, on a byte-level BPE trained here and on SmolLM2's real tokenizer."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from gamejax.data import tokenizer as tokenizer_lib
from gamejax.data.tokenizer import (BOS, EOS, ByteTokenizer, HFTokenizer, Tokenizer,
                                    TokenizerError, load_tokenizer)

# SmolLM2-135M-Instruct's chat template, exactly as its GGUF carries it (metadata
# tokenizer.chat_template; its jinja string literals hold real newlines).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")

# A template over several indented lines: whitespace control (trim_blocks, lstrip_blocks), `set`,
# `namespace`, loop controls, `tojson` (no HTML escaping) and the special-token variables.
MULTILINE_TEMPLATE = """{%- set ns = namespace(system='You are helpful.') %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] %}
{%- endif %}
{{ bos_token }}system: {{ ns.system }}
{{ {"turns": messages | length, "tag": "<x> & 'y'"} | tojson }}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% continue %}
    {% endif %}
    {% if message['role'] not in ['user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    <{{ message['role'] }}>
    {{ message['content'] }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
    <assistant>
{% endif %}"""

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

TEXTS = [
    "", " ", "\n", "hello world", "Hello, World! How's it going?",
    "  leading and   inner   runs of spaces   ", "tabs\tand\ttabs\nnew\n\nlines\r\n",
    "café naïve résumé Ångström Øre ß", "日本語のテキスト、中文字符和한국어", "emoji 🎉🚀 and 👩‍👩‍👧 and 🇫🇷",
    "numbers 1234567890 3.14159 -42 1e-9", "code: def f(x):\n    return x ** 2  # square\n",
    "special <|im_start|>user\nhi<|im_end|>\n and <|endoftext|> inside", "<|im_end|><|im_end|>",
    "almost special <|im_end and im_end|>", "\u00a0no-break\u200bzero-width\u2028line sep",
]

CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Traduis « bonjour » en 日本語"},
     {"role": "assistant", "content": "こんにちは 🙂\n\n  (konnichiwa)"},
     {"role": "user", "content": "Merci.\tEt <b>'au revoir'</b>?"},
     {"role": "assistant", "content": "さようなら"}],
]


def _training_lines() -> list[str]:
  words = ("the a game player agent opponent move token record chat template learns plays wins "
           "loses draws sums numbers answer question system user assistant hello world").split()
  lines = []
  for i in range(300):
    w = [words[(i * 7 + k * 3) % len(words)] for k in range(3 + i % 9)]
    lines.append(" ".join(w).capitalize() + (".", "?", "!", ",")[i % 4] + f" {i * 37 % 1000}")
  lines += ["café naïve résumé Ångström", "日本語のテキスト 中文 한국어", "emoji 🎉🚀👩‍👩‍👧",
            "def f(x):\n    return x ** 2\n", "tabs\tand\nnewlines",
            "<|im_start|>user\nhi<|im_end|>"]
  return lines


def build_bpe_dir(path, template: str | None = SMOLLM2_TEMPLATE, *, jinja_file: bool = True) -> str:
  """A byte-level BPE trained here, saved with transformers' ``save_pretrained`` into ``path``
  with bos/eos/pad tokens and ``template`` (as ``chat_template.jinja``, or with
  ``jinja_file=False`` inside ``tokenizer_config.json``)."""
  from tokenizers import Tokenizer as Backend
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast
  backend = Backend(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  backend.post_processor = processors.ByteLevel(trim_offsets=False)
  trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=list(SPECIALS), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  backend.train_from_iterator(_training_lines(), trainer)
  hf = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                               eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               chat_template=template)
  hf.save_pretrained(str(path))
  if template is not None and not jinja_file:
    os.remove(os.path.join(path, "chat_template.jinja"))
    _edit_config(path, chat_template=template)
  return str(path)


def _edit_config(path, **changes) -> None:
  file = os.path.join(path, "tokenizer_config.json")
  with open(file, encoding="utf-8") as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(file, "w", encoding="utf-8") as f:
    json.dump(cfg, f)


def auto_tokenizer(path):
  from transformers import AutoTokenizer
  return AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  return build_bpe_dir(tmp_path_factory.mktemp("bpe"))


def check_parity(ours: HFTokenizer, theirs, texts=TEXTS, chats=CHATS) -> None:
  assert ours.vocab_size == len(theirs)
  for text in texts:
    want = theirs.encode(text, add_special_tokens=False)
    got = ours.encode(text)
    assert got.dtype == np.int32 and got.tolist() == want, text
    assert ours.decode(got) == theirs.decode(want, skip_special_tokens=True), text
  for chat in chats:
    for gen in (False, True):
      text = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
      assert ours.apply_chat_template(chat, add_generation_prompt=gen) == text
      ids = theirs.encode(text, add_special_tokens=False)
      assert ours.encode(text).tolist() == ids
      assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)  # specials skipped


def test_bpe_parity_with_transformers(bpe_dir):
  ours, theirs = HFTokenizer.from_dir(bpe_dir), auto_tokenizer(bpe_dir)
  assert os.path.exists(os.path.join(bpe_dir, "chat_template.jinja"))   # transformers 5 writes it
  check_parity(ours, theirs)
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (theirs.bos_token_id, theirs.eos_token_id,
                                                     theirs.pad_token_id)
  assert not ours.add_bos and isinstance(ours, Tokenizer)
  # text without special tokens round-trips
  for text in TEXTS:
    if not any(s in text for s in SPECIALS):
      assert ours.decode(ours.encode(text)) == text
  texts = ours.token_texts()
  assert len(texts) == ours.vocab_size and texts[ours.eos_id] == "<|im_end|>"
  assert texts == [theirs.decode([i]) for i in range(len(theirs))]


def test_decode_until_eos_and_out_of_vocab_ids(bpe_dir):
  tok = HFTokenizer.from_dir(bpe_dir)
  ids = np.concatenate([tok.encode("answer 42"), [tok.eos_id], tok.encode(" ignored")])
  assert tok.decode_until_eos(ids) == "answer 42"
  assert tok.decode_until_eos(ids[None, :]) == "answer 42"        # any shape, read flat
  # a model's vocabulary is rounded up past the tokenizer's: those ids decode to nothing
  assert tok.decode([*tok.encode("ok"), tok.vocab_size, tok.vocab_size + 5, tok.pad_id]) == "ok"


def test_multiline_template_parity(tmp_path):
  path = build_bpe_dir(tmp_path / "tok", MULTILINE_TEMPLATE)
  ours, theirs = HFTokenizer.from_dir(path), auto_tokenizer(path)
  check_parity(ours, theirs, texts=TEXTS[:3])
  text = ours.apply_chat_template(CHATS[2])
  assert '{"turns": 4, "tag": "<x> & \'y\'"}' in text      # transformers' tojson: no escaping
  with pytest.raises(TokenizerError, match=r"chat_template\.jinja: .*unknown role tool"):
    ours.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("form", ["string", "list"])
def test_template_in_tokenizer_config(tmp_path, form):
  path = build_bpe_dir(tmp_path / "tok", SMOLLM2_TEMPLATE, jinja_file=False)
  if form == "list":
    _edit_config(path, chat_template=[{"name": "tool_use", "template": "{{ 'tools' }}"},
                                      {"name": "default", "template": SMOLLM2_TEMPLATE}])
  # special tokens may also be written as AddedToken dicts (older tokenizer_config.json files)
  _edit_config(path, bos_token={"__type": "AddedToken", "content": "<|im_start|>", "lstrip": False,
                                "normalized": False, "rstrip": False, "single_word": False,
                                "special": True})
  ours, theirs = HFTokenizer.from_dir(path), auto_tokenizer(path)
  assert not os.path.exists(os.path.join(path, "chat_template.jinja"))
  check_parity(ours, theirs, texts=TEXTS[:3])
  assert ours.bos_id == theirs.bos_token_id


def test_jinja_file_wins_over_config(tmp_path):
  path = build_bpe_dir(tmp_path / "tok", SMOLLM2_TEMPLATE)
  _edit_config(path, chat_template="{{ 'from the config' }}")
  ours, theirs = HFTokenizer.from_dir(path), auto_tokenizer(path)
  check_parity(ours, theirs, texts=[])
  assert ours.apply_chat_template(CHATS[0]).startswith("<|im_start|>system")


def test_add_bos_token(tmp_path):
  path = build_bpe_dir(tmp_path / "tok")
  _edit_config(path, add_bos_token=True)
  tok = load_tokenizer(f"hf:{path}")
  assert tok.add_bos and tok.bos_id == tok.encode("<|im_start|>").tolist()[0]


def test_byte_tokenizer_chat_convention():
  tok = load_tokenizer("byte")
  assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
  chat = CHATS[2]
  assert tok.apply_chat_template(chat) == "".join(m["content"] for m in chat)
  assert tok.apply_chat_template(chat, add_generation_prompt=True) == tok.apply_chat_template(chat)
  ids, agent = tok.encode_chat(chat)
  want_ids, want_agent = [BOS], [False]
  for m in chat:
    piece = list(tok.encode(m["content"])) + ([EOS] if m["role"] == "assistant" else [])
    want_ids += piece
    want_agent += [m["role"] == "assistant"] * len(piece)
  assert ids.tolist() == want_ids and agent.tolist() == want_agent
  assert tok.decode(ids) == tok.apply_chat_template(chat)
  assert len(tok.token_texts()) == tok.vocab_size


def test_bad_tokenizer_folders(tmp_path, bpe_dir):
  with pytest.raises(TokenizerError, match="tokenizer folder .*missing.* does not exist"):
    load_tokenizer(f"hf:{tmp_path / 'missing'}")
  (tmp_path / "empty").mkdir()
  with pytest.raises(TokenizerError, match=r"empty/tokenizer\.json: no such file"):
    load_tokenizer(f"hf:{tmp_path / 'empty'}")
  corrupt = tmp_path / "corrupt"
  shutil.copytree(bpe_dir, corrupt)
  (corrupt / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"')
  with pytest.raises(TokenizerError, match=r"corrupt/tokenizer\.json: not a readable"):
    load_tokenizer(f"hf:{corrupt}")
  bad_cfg = tmp_path / "bad_cfg"
  shutil.copytree(bpe_dir, bad_cfg)
  (bad_cfg / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>",')
  with pytest.raises(TokenizerError, match=r"bad_cfg/tokenizer_config\.json: not valid JSON"):
    load_tokenizer(f"hf:{bad_cfg}")
  unknown_eos = tmp_path / "unknown_eos"
  shutil.copytree(bpe_dir, unknown_eos)
  _edit_config(unknown_eos, eos_token="<|nope|>")
  with pytest.raises(TokenizerError, match=r"config\.json: eos_token '<\|nope\|>' is not in the"):
    load_tokenizer(f"hf:{unknown_eos}")


def test_unknown_specs():
  for spec in ("gpt2", "hf:", "HF:/x", "bytes"):
    with pytest.raises(ValueError, match=rf"unknown tokenizer {spec!r}: expected 'byte' or 'hf:"):
      load_tokenizer(spec)


def test_bad_templates(tmp_path):
  path = build_bpe_dir(tmp_path / "syntax", "hello\n{% for m in messages %}{{ m.content }")
  with pytest.raises(TokenizerError, match=r"syntax/chat_template\.jinja: chat template line 2"):
    load_tokenizer(f"hf:{path}").apply_chat_template(CHATS[0])
  path = build_bpe_dir(tmp_path / "key", "{{ messages[0]['nope'] + 1 }}")
  with pytest.raises(TokenizerError, match=r"key/chat_template\.jinja: chat template failed to "
                                           "render"):
    load_tokenizer(f"hf:{path}").apply_chat_template(CHATS[0])
  path = build_bpe_dir(tmp_path / "none", None)
  with pytest.raises(TokenizerError, match="no chat template"):
    load_tokenizer(f"hf:{path}").apply_chat_template(CHATS[0])
  path = build_bpe_dir(tmp_path / "escape", "{{ namespace(_x=1) }}")
  with pytest.raises(TokenizerError, match="underscore"):
    load_tokenizer(f"hf:{path}").apply_chat_template(CHATS[0])


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct's real tokenizer, which transformers builds from the GGUF.

@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory, smollm2_gguf):
  gguf = smollm2_gguf
  from transformers import AutoTokenizer
  theirs = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
  path = str(tmp_path_factory.mktemp("smollm2"))
  theirs.save_pretrained(path)
  return path


def test_smollm2_parity(smollm2_dir):
  ours, theirs = load_tokenizer(f"hf:{smollm2_dir}"), auto_tokenizer(smollm2_dir)
  assert ours.vocab_size == 49152
  check_parity(ours, theirs)
  assert ours.apply_chat_template(CHATS[0], add_generation_prompt=True) == (
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
      "<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
  assert tokenizer_lib.HFTokenizer.from_dir(smollm2_dir).chat_template == SMOLLM2_TEMPLATE
