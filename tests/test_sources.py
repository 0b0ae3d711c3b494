"""Data sources: the arithmetic arena and local_text TFDS builders behind load_source."""
import json
import os

import numpy as np
import pytest

from gamejax.data import arena, sources
from gamejax.data.loader import PackedLoader
from gamejax.data.tokenizer import BOS, EOS, ByteTokenizer
from gamejax.games import arithmetic
from gamejax.records import AGENT, OPPONENT

TOK = ByteTokenizer()
ARENA = dict(max_digits=2, players=[("drop_carry:0", 1.0), ("perfect", 1.0)], num_train=120,
             num_test=25, seed=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def arena_splits(data_dir):
  return {s: sources.load_source("arithmetic_arena", s, data_dir, **ARENA)
          for s in ("train", "test")}


def split_of(example):
  """Opponent move, agent move (text) and the player ids split at the move boundary."""
  tokens, players = example["tokens"], example["players"]
  opp = np.flatnonzero(players == OPPONENT)
  return TOK.decode(tokens[opp]), TOK.decode(tokens[opp[-1] + 1:]), opp


def test_arena_examples(arena_splits):
  train = arena_splits["train"]
  assert len(train) == 120 and len(arena_splits["test"]) == 25
  examples = train.__getitems__(range(len(train)))
  for i in (0, 7, 119):
    assert set(train[i]) == {"tokens", "players", "outcome", "a", "b", "op", "answer", "player"}
  for ex in examples:
    assert ex["tokens"].dtype == np.int32 and ex["players"].dtype == np.int8
    problem = arithmetic.Problem(int(ex["a"]), int(ex["b"]), ex["op"])
    assert int(ex["answer"]) == problem.answer
    assert ex["player"] in ("drop_carry:0", "perfect")
    question, reply, opp = split_of(ex)
    # BOS + question by OPPONENT, then the worked answer + EOS by AGENT
    assert ex["tokens"][0] == BOS and ex["tokens"][-1] == EOS
    np.testing.assert_array_equal(opp, np.arange(len(opp)))
    assert np.all(ex["players"][len(opp):] == AGENT)
    assert question == problem.question_text(ARENA["max_digits"])   # zero-padded operands
    assert arithmetic.parse_answer(reply) is not None
    assert int(ex["outcome"]) == int(arithmetic.parse_answer(reply) == problem.answer)
    if ex["player"] == "perfect":
      assert int(ex["outcome"]) == 1
  assert {ex["player"] for ex in examples} == {"drop_carry:0", "perfect"}


def test_arena_test_split_disjoint_from_train(arena_splits):
  cfg = arithmetic.ArenaConfig(max_digits=2)

  def problems(src):
    return [arithmetic.Problem(int(e["a"]), int(e["b"]), e["op"])
            for e in src.__getitems__(range(len(src)))]

  train, test = problems(arena_splits["train"]), problems(arena_splits["test"])
  assert not set(train) & set(test)
  assert len(set(test)) == len(test)  # test problems are unique
  assert not any(arithmetic.is_test(p, cfg) for p in train)
  assert all(arithmetic.is_test(p, cfg) for p in test)


def test_arena_built_once_then_reused(arena_splits, data_dir, monkeypatch):
  builder = arena_splits["train"].builder
  files = sorted(builder.data_path.iterdir())
  mtimes = [os.stat(f).st_mtime_ns for f in files]
  calls = []
  real = arithmetic.generate_examples

  def counting(*args, **kwargs):
    calls.append(args)
    return real(*args, **kwargs)

  monkeypatch.setattr(arithmetic, "generate_examples", counting)
  again = sources.load_source("arithmetic_arena", "train", data_dir, **ARENA)
  assert calls == []
  assert [os.stat(f).st_mtime_ns for f in sorted(again.builder.data_path.iterdir())] == mtimes
  np.testing.assert_array_equal(again[5]["tokens"], arena_splits["train"][5]["tokens"])

  # different parameters build a new dataset next to the old one
  other = sources.load_source("arithmetic_arena", "train", data_dir, **{**ARENA, "seed": 4})
  assert len(calls) == 2  # train and test splits
  assert other.builder.builder_config.name != builder.builder_config.name
  assert other.builder.data_path != builder.data_path


def test_lengths_are_counted_once_and_kept_beside_the_data(arena_splits, data_dir, monkeypatch):
  train = arena_splits["train"]
  want = [len(train[i]["tokens"]) for i in range(len(train))]
  np.testing.assert_array_equal(train.lengths(), want)
  kept = os.path.join(train.builder.data_dir, "lengths", "train.npy")
  np.testing.assert_array_equal(np.load(kept), want)
  again = sources.load_source("arithmetic_arena", "train", data_dir, **ARENA)
  monkeypatch.setattr(again._data, "__getitems__", None)  # reading an example now fails
  np.testing.assert_array_equal(again.lengths(), want)
  # a packed loader on the source plans from the lengths and reads only its rows' examples
  read = []
  real = type(train._data).__getitems__
  monkeypatch.setattr(type(train._data), "__getitems__",
                      lambda self, ids: read.extend(ids) or real(self, ids))
  half = PackedLoader(train, 4, 24, seed=0)
  half.only_rows(slice(0, 1))
  got = next(half)
  assert got["tokens"].shape == (1, 24) and 0 < len(read) < 6


def test_lengths_that_cannot_be_kept_leave_nothing_behind(tmp_path, monkeypatch, caplog):
  def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(np, "save", disk_full)
  sources._write_lengths(str(tmp_path / "lengths" / "train.npy"), np.arange(3, dtype=np.int32))
  assert os.listdir(tmp_path / "lengths") == []
  assert "could not keep the example lengths" in caplog.text


def test_arena_config_names():
  a = arena.arena_config(players=["slip:5e-2"], max_digits=2)
  b = arena.arena_config(players=[("slip:0.05", 1.0)], max_digits=2)
  c = arena.arena_config(players=[("slip:0.05", 1.0)], max_digits=2, outcome_tag=True)
  assert a.name == b.name != c.name
  assert a.name.startswith("add-sub_d1-2_worked_") and "_tagged_" in c.name
  assert json.loads(a.description)["players"] == [["slip:0.05", 1.0]]
  with pytest.raises(ValueError, match="num_train"):
    arena.arena_config(num_train=0)
  with pytest.raises(ValueError, match="bad player spec"):
    arena.arena_config(players=["sloppy"])


def test_build_is_quiet(tmp_path, capsys):
  sources.load_source("arithmetic_arena", "train", str(tmp_path), max_digits=1, ops="+",
                      num_train=10, num_test=0)
  assert capsys.readouterr().out == ""


def test_unknown_names_and_splits(data_dir):
  with pytest.raises(ValueError, match=r"unknown data source 'arithmetic_arna'.*'arithmetic_arena"):
    sources.load_source("arithmetic_arna", "train", data_dir)
  with pytest.raises(ValueError, match=r"'max_digit'.*did you mean 'max_digits'"):
    sources.load_source("arithmetic_arena", "train", data_dir, max_digit=2)
  with pytest.raises(ValueError, match=r"no split 'valid'.*\['train', 'test'\]"):
    sources.load_source("arithmetic_arena", "valid", data_dir, **ARENA)
  with pytest.raises(ValueError, match="needs path"):
    sources.load_source("local_text", "train", data_dir)


def write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")


@pytest.fixture
def text_folder(tmp_path):
  folder = tmp_path / "my_notes"
  write(folder / "a.txt", "First paragraph.\nStill first.\n\n\nSecond paragraph.\n")
  write(folder / "b.jsonl", '{"text": "plain line"}\n\n{"prompt": "Q?", "response": "A!"}\n')
  write(folder / "sub" / "c.txt", "héllo")
  write(folder / "ignored.md", "not a record")
  return folder


def by_file_line(src):
  return {(e["file"], int(e["line"])): e for e in src.__getitems__(range(len(src)))}


def expect_text(ex, text):
  np.testing.assert_array_equal(ex["tokens"], np.concatenate([[BOS], TOK.encode(text), [EOS]]))
  assert np.all(ex["players"] == OPPONENT)


def test_local_text_records_and_players(text_folder, tmp_path):
  data_dir = str(tmp_path / "data")
  src = sources.load_source("local_text", "train", data_dir, path=str(text_folder),
                            split_paragraphs=True, test_fraction=0.0)
  recs = by_file_line(src)
  assert sorted(recs) == [("a.txt", 1), ("a.txt", 5), ("b.jsonl", 1), ("b.jsonl", 3),
                          (os.path.join("sub", "c.txt"), 1)]
  expect_text(recs[("a.txt", 1)], "First paragraph.\nStill first.")
  expect_text(recs[("a.txt", 5)], "Second paragraph.")
  expect_text(recs[("b.jsonl", 1)], "plain line")
  expect_text(recs[(os.path.join("sub", "c.txt"), 1)], "héllo")
  pr = recs[("b.jsonl", 3)]
  np.testing.assert_array_equal(pr["tokens"], [BOS, *TOK.encode("Q?"), *TOK.encode("A!"), EOS])
  np.testing.assert_array_equal(pr["players"], [OPPONENT] * 3 + [AGENT] * 3)
  with pytest.raises(ValueError, match="no split 'test'"):
    sources.load_source("local_text", "test", data_dir, path=str(text_folder),
                        split_paragraphs=True, test_fraction=0.0)

  whole = sources.load_source("local_text", "train", data_dir, path=str(text_folder),
                              test_fraction=0.0)
  recs = by_file_line(whole)
  assert len(whole) == 4
  expect_text(recs[("a.txt", 1)], "First paragraph.\nStill first.\n\n\nSecond paragraph.\n")

  # packs into batches like any source
  batch = next(PackedLoader(whole, 2, 64, seed=0))
  assert batch["tokens"].shape == (2, 64)


def test_local_text_test_split_and_rebuild_on_edit(text_folder, tmp_path):
  data_dir = str(tmp_path / "data")
  params = dict(path=str(text_folder), split_paragraphs=True, test_fraction=0.4)
  train = sources.load_source("local_text", "train", data_dir, **params)
  test = sources.load_source("local_text", "test", data_dir, **params)
  assert (len(train), len(test)) == (3, 2)  # round(0.4 * 5) held out
  assert not set(by_file_line(train)) & set(by_file_line(test))
  again = sources.load_source("local_text", "test", data_dir, **params)
  assert set(by_file_line(again)) == set(by_file_line(test))  # deterministic

  write(text_folder / "d.txt", "One more.\n\nAnd another.")
  edited = [sources.load_source("local_text", s, data_dir, **params) for s in ("train", "test")]
  assert sum(map(len, edited)) == 7
  assert edited[0].builder.builder_config.name != train.builder.builder_config.name


@pytest.mark.parametrize("line,why", [
    ('{"text": "ok"}\n{"text": "ok"}\n{bad json\n', "not valid JSON"),
    ('{"text": "ok"}\n\n{"prompt": "only"}\n', "expected"),
])
def test_local_text_bad_jsonl_names_file_and_line(tmp_path, line, why):
  write(tmp_path / "in" / "data.jsonl", line)
  with pytest.raises(ValueError, match=rf"data\.jsonl line 3: {why}"):
    sources.load_source("local_text", "train", str(tmp_path / "data"), path=str(tmp_path / "in"))


def test_local_text_folder_errors(tmp_path):
  data_dir = str(tmp_path / "data")
  with pytest.raises(ValueError, match="does not exist"):
    sources.load_source("local_text", "train", data_dir, path=str(tmp_path / "missing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"no \.txt or \.jsonl files"):
    sources.load_source("local_text", "train", data_dir, path=str(tmp_path / "empty"))
  write(tmp_path / "blank" / "a.txt", "  \n\n")
  write(tmp_path / "blank" / "b.jsonl", "\n")
  with pytest.raises(ValueError, match="no usable records"):
    sources.load_source("local_text", "train", data_dir, path=str(tmp_path / "blank"))
  (tmp_path / "binary").mkdir()
  (tmp_path / "binary" / "x.txt").write_bytes(b"ok\xff")
  with pytest.raises(ValueError, match=r"x\.txt: not valid UTF-8"):
    sources.load_source("local_text", "train", data_dir, path=str(tmp_path / "binary"))


def test_builders_are_registered_with_tfds(tmp_path):
  import tensorflow_datasets as tfds
  from gamejax.data import arena as arena_lib
  builder = tfds.builder("arithmetic_arena", config=arena_lib.arena_config(num_train=30, num_test=5),
                         data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert len(builder.as_data_source()["train"]) == 30
  assert tfds.builder_cls("local_text").__name__ == "LocalText"
