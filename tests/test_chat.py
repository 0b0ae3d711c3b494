"""Chat JSONL lines (``{"messages": [...]}``) as local_text game records: every token's player
checked against the chat's text cut by hand, and the tokens against transformers' own
``apply_chat_template``."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest

from gamejax import config as gamejax_config
from gamejax.data import local_text, sources
from gamejax.data.tokenizer import BOS, EOS, ByteTokenizer
from gamejax.records import AGENT, OPPONENT

from test_tokenizer import MULTILINE_TEMPLATE, auto_tokenizer, build_bpe_dir

SYSTEM = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
          "<|im_end|>\n")
CHAT = [{"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4, of course."},
        {"role": "user", "content": "And in 日本語? 🙂"},
        {"role": "assistant", "content": "四 (yon)\n\nor よん."}]
# The chat as SmolLM2's template renders it, cut by hand into (text, player) runs.
CHAT_RUNS = [
    (SYSTEM + "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", OPPONENT),
    ("4, of course.<|im_end|>\n", AGENT),
    ("<|im_start|>user\nAnd in 日本語? 🙂<|im_end|>\n<|im_start|>assistant\n", OPPONENT),
    ("四 (yon)\n\nor よん.<|im_end|>\n", AGENT),
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  return build_bpe_dir(tmp_path_factory.mktemp("bpe"))


def write_jsonl(folder, *objs, name="chat.jsonl"):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
    for obj in objs:
      f.write((obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)) + "\n")
  return str(folder)


def records(folder, data_dir, tokenizer="byte"):
  src = sources.load_source("local_text", "train", str(data_dir), path=folder, test_fraction=0.0,
                            tokenizer=tokenizer)
  return {int(e["line"]): e for e in src.__getitems__(range(len(src)))}


def runs(tokens, players):
  """Maximal runs of one player: ``[(token ids, player)]``."""
  cuts = np.flatnonzero(np.diff(players)) + 1
  return [(t, int(p[0])) for t, p in zip(np.split(tokens, cuts), np.split(players, cuts))]


def test_chat_records_with_an_hf_tokenizer(bpe_dir, tmp_path):
  theirs = auto_tokenizer(bpe_dir)
  folder = write_jsonl(tmp_path / "in", {"messages": CHAT},
                       {"messages": CHAT[:2] + [{"role": "user", "content": "Thanks!"}]},
                       {"text": "plain"}, {"prompt": "Q?", "response": "A!"})
  recs = records(folder, tmp_path / "data", f"hf:{bpe_dir}")
  tokens, players = recs[1]["tokens"], recs[1]["players"]
  got = [(theirs.decode(t, skip_special_tokens=False), p) for t, p in runs(tokens, players)]
  assert got == CHAT_RUNS
  # the tokens are transformers' tokens of the whole rendered chat (no BOS/EOS added)
  assert tokens.tolist() == theirs.apply_chat_template(CHAT, tokenize=True, return_dict=False)
  assert theirs.decode(tokens) == theirs.apply_chat_template(CHAT, tokenize=False)

  # a user turn after the last assistant turn is the opponent's
  tokens, players = recs[2]["tokens"], recs[2]["players"]
  got = [(theirs.decode(t, skip_special_tokens=False), p) for t, p in runs(tokens, players)]
  assert got == CHAT_RUNS[:2] + [("<|im_start|>user\nThanks!<|im_end|>\n", OPPONENT)]

  # text and prompt/response lines use the same tokenizer: no BOS (add_bos_token is unset), its EOS
  eos = theirs.eos_token_id
  np.testing.assert_array_equal(recs[3]["tokens"], theirs.encode("plain") + [eos])
  assert np.all(recs[3]["players"] == OPPONENT)
  np.testing.assert_array_equal(recs[4]["tokens"],
                                theirs.encode("Q?") + theirs.encode("A!") + [eos])
  assert recs[4]["players"].tolist() == [OPPONENT] * len(theirs.encode("Q?")) + [AGENT] * (
      len(theirs.encode("A!")) + 1)


def test_chat_records_with_the_byte_tokenizer(tmp_path):
  tok = ByteTokenizer()
  chat = [{"role": "system", "content": "Be brief."}] + CHAT
  folder = write_jsonl(tmp_path / "in", {"messages": chat})
  rec = records(folder, tmp_path / "data")[1]
  want_tokens, want_players = [BOS], [OPPONENT]
  for m in chat:  # BOS, then each content; an assistant's content and the EOS after it are AGENT
    ids = list(tok.encode(m["content"])) + ([EOS] if m["role"] == "assistant" else [])
    want_tokens += ids
    want_players += [AGENT if m["role"] == "assistant" else OPPONENT] * len(ids)
  assert rec["tokens"].tolist() == want_tokens and rec["players"].tolist() == want_players


@pytest.mark.parametrize("line,why", [
    ({"msgs": []}, r'expected an object \{"text": str\}'),
    ({"messages": "hi"}, r'"messages" must be a non-empty list'),
    ({"messages": []}, r'"messages" must be a non-empty list'),
    ({"messages": [{"content": "x"}]}, r'message 0 must be \{"role": str, "content": str\}'),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant"}]},
     r'message 1 must be \{"role": str, "content": str\}'),
    ({"messages": [{"role": "user", "content": 3}]}, r"message 0 must be"),
    ({"messages": [{"role": "tool", "content": "x"}]},
     r"message 0 has unknown role 'tool'; expected one of system, user, assistant"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"no assistant message"),
])
def test_bad_chat_lines_name_file_and_line(tmp_path, line, why):
  folder = write_jsonl(tmp_path / "in", {"text": "ok"}, line)
  with pytest.raises(ValueError, match=rf"chat\.jsonl line 2: {why}"):
    records(folder, tmp_path / "data")


def test_template_that_is_not_prefix_consistent(tmp_path):
  # MULTILINE_TEMPLATE writes the number of turns at the top: a longer chat changes its beginning
  tok_dir = build_bpe_dir(tmp_path / "tok", MULTILINE_TEMPLATE)
  folder = write_jsonl(tmp_path / "in", {"text": "ok"}, {"messages": CHAT})
  with pytest.raises(ValueError, match=r"chat\.jsonl line 2: .*chat_template\.jinja: chat "
                                       r"template is not prefix-consistent"):
    records(folder, tmp_path / "data", f"hf:{tok_dir}")
  # a template that fails on a line names that line too
  bad_dir = build_bpe_dir(tmp_path / "bad", "{{ raise_exception('no chats here') }}")
  with pytest.raises(ValueError, match=r"chat\.jsonl line 2: .*chat_template\.jinja: chat "
                                       r"template failed to render: no chats here"):
    records(folder, tmp_path / "data", f"hf:{bad_dir}")


def _old_name(path: str) -> str:
  """The config name as local_text computed it before tokenizers were a parameter."""
  files = []
  for rel in local_text.list_files(path):
    st = os.stat(os.path.join(path, rel))
    files.append([rel, st.st_size, st.st_mtime_ns])
  fingerprint = json.dumps({"path": path, "split_paragraphs": False, "test_fraction": 0.1,
                            "test_count": None, "files": files, "format": 1}, sort_keys=True)
  return f"in_{hashlib.sha256(fingerprint.encode('utf-8')).hexdigest()[:10]}"


def test_config_names_and_gin(bpe_dir, tmp_path):
  folder = os.path.realpath(write_jsonl(tmp_path / "in", {"messages": CHAT}))
  byte = local_text.local_text_config(folder)
  assert byte.name == _old_name(folder)
  assert local_text.local_text_config(folder, tokenizer="byte").name == byte.name
  hf = local_text.local_text_config(folder, tokenizer=f"hf:{bpe_dir}")
  assert hf.name != byte.name and hf.tokenizer == f"hf:{os.path.realpath(bpe_dir)}"
  # editing the tokenizer's files (here its chat template) names a new dataset
  edited = tmp_path / "edited"
  build_bpe_dir(edited)
  first = local_text.local_text_config(folder, tokenizer=f"hf:{edited}").name
  with open(edited / "chat_template.jinja", "a", encoding="utf-8") as f:
    f.write("{# edited #}")
  assert local_text.local_text_config(folder, tokenizer=f"hf:{edited}").name != first
  with pytest.raises(ValueError, match="unknown tokenizer 'gpt2'"):
    local_text.local_text_config(folder, tokenizer="gpt2")
  with pytest.raises(ValueError, match="tokenizer folder .* does not exist"):
    sources.load_source("local_text", "train", str(tmp_path / "d"), path=folder,
                        tokenizer=f"hf:{tmp_path / 'nope'}")
  # gin's local_text passes the tokenizer on to the source
  spec = gamejax_config.local_text(folder, tokenizer=f"hf:{bpe_dir}")
  assert spec.params["tokenizer"] == f"hf:{bpe_dir}"
  assert spec.load("train", str(tmp_path / "d"))[0]["tokens"].tolist() == (
      auto_tokenizer(bpe_dir).apply_chat_template(CHAT, tokenize=True, return_dict=False))
