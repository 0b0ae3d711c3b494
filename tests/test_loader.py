"""PackedLoader: packing layout, epoch coverage, determinism, exact resume, too-long handling."""
import json

import jax
import numpy as np
import pytest

from gamejax.data.loader import PackedLoader
from gamejax.records import AGENT, OPPONENT, GameRecord, next_token_weights


def make_source(lengths, start=1):
  """Example i has distinct tokens 1000*i + start + arange(n) and players OPPONENT then AGENT."""
  src = []
  for i, n in enumerate(lengths):
    players = np.full(n, AGENT, np.int8)
    players[:(n + 1) // 2] = OPPONENT
    src.append({"tokens": (1000 * i + start + np.arange(n)).astype(np.int32), "players": players})
  return src


def reference_rows(src, seq_len, seed, shuffle, too_long, num_rows):
  """Independent NumPy reference: a stream of packed rows (lists of (example id, length))."""
  rows, row, col, epoch = [], [], 0, 0
  while len(rows) < num_rows:
    order = (np.random.default_rng([seed, epoch]).permutation(len(src)) if shuffle
             else np.arange(len(src)))
    for i in order:
      n = len(src[i]["tokens"])
      if n == 0 or (n > seq_len and too_long == "skip"):
        continue
      n = min(n, seq_len)
      if col + n > seq_len:
        rows.append(row)
        row, col = [], 0
      row.append((int(i), n))
      col += n
    epoch += 1
  return rows[:num_rows]


def render(src, rows, seq_len):
  """Rows of (example, length) -> int32 arrays of the four batch fields."""
  out = {k: np.zeros((len(rows), seq_len), np.int32)
         for k in ("tokens", "positions", "segment_ids", "players")}
  for r, row in enumerate(rows):
    col = 0
    for seg, (i, n) in enumerate(row, start=1):
      out["tokens"][r, col:col + n] = src[i]["tokens"][:n]
      out["players"][r, col:col + n] = src[i]["players"][:n]
      out["segment_ids"][r, col:col + n] = seg
      out["positions"][r, col:col + n] = np.arange(n)
      col += n
  return out


def take(loader, n):
  return [next(loader) for _ in range(n)]


def assert_batches_equal(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert sorted(g) == sorted(w)
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def test_hand_computed_layout():
  src = make_source([3, 2, 4, 6, 1])
  loader = PackedLoader(src, batch_size=2, seq_len=6, seed=0, shuffle=False)
  b0, b1 = take(loader, 2)
  # batch 0: row 0 = ex0 + ex1 (ex2 does not fit), row 1 = ex2 (ex3 does not fit).
  np.testing.assert_array_equal(b0["tokens"], [[1, 2, 3, 1001, 1002, 0],
                                               [2001, 2002, 2003, 2004, 0, 0]])
  np.testing.assert_array_equal(b0["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(b0["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
  np.testing.assert_array_equal(b0["players"], [[2, 2, 1, 2, 1, 0], [2, 2, 1, 1, 0, 0]])
  # batch 1: row 0 = ex3 (full), row 1 = ex4, then epoch 1 starts: ex0 + ex1 fill the row.
  np.testing.assert_array_equal(b1["tokens"], [[3001, 3002, 3003, 3004, 3005, 3006],
                                               [4001, 1, 2, 3, 1001, 1002]])
  np.testing.assert_array_equal(b1["segment_ids"], [[1] * 6, [1, 2, 2, 2, 3, 3]])
  np.testing.assert_array_equal(b1["positions"], [[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 0, 1]])
  for b in (b0, b1):
    assert all(v.dtype == np.int32 and v.shape == (2, 6) for v in b.values())
  assert loader.stats == {"examples": 7, "truncated": 0, "skipped": 0}
  assert loader.get_state()["epoch"] == 1 and loader.get_state()["index"] == 2


@pytest.mark.parametrize("shuffle,too_long", [(True, "truncate"), (False, "truncate"),
                                              (True, "skip")])
def test_matches_numpy_reference(shuffle, too_long):
  rng = np.random.default_rng(7)
  src = make_source(rng.integers(1, 40, size=37).tolist() + [55, 70])  # two longer than seq_len
  batch_size, seq_len, num_batches = 4, 48, 25
  loader = PackedLoader(src, batch_size, seq_len, seed=3, shuffle=shuffle, too_long=too_long)
  got = take(loader, num_batches)
  rows = reference_rows(src, seq_len, 3, shuffle, too_long, batch_size * num_batches)
  want = [render(src, rows[i:i + batch_size], seq_len)
          for i in range(0, len(rows), batch_size)]
  assert_batches_equal(got, want)


def segments(batches):
  """Every packed segment's tokens, in packing order."""
  out = []
  for b in batches:
    for r in range(b["tokens"].shape[0]):
      for s in range(1, b["segment_ids"][r].max() + 1):
        sel = b["segment_ids"][r] == s
        np.testing.assert_array_equal(b["positions"][r][sel], np.arange(sel.sum()))
        out.append(b["tokens"][r][sel])
  return out


def test_each_epoch_covers_every_example_once_in_seeded_order():
  rng = np.random.default_rng(0)
  src = make_source(rng.integers(1, 20, size=50).tolist())
  loader = PackedLoader(src, batch_size=3, seq_len=32, seed=11)
  segs = segments(take(loader, 40))
  assert len(segs) > 2 * len(src)
  for epoch in (0, 1):
    order = np.random.default_rng([11, epoch]).permutation(len(src))
    epoch_segs = segs[epoch * len(src):(epoch + 1) * len(src)]
    for seg, i in zip(epoch_segs, order):
      np.testing.assert_array_equal(seg, src[i]["tokens"])
    # no token lost or duplicated within the epoch
    all_tokens = np.sort(np.concatenate(epoch_segs))
    np.testing.assert_array_equal(all_tokens, np.sort(np.concatenate([e["tokens"] for e in src])))


def test_deterministic_by_seed():
  src = make_source(np.random.default_rng(1).integers(1, 30, size=40).tolist())
  a = take(PackedLoader(src, 2, 64, seed=5), 10)
  b = take(PackedLoader(src, 2, 64, seed=5), 10)
  c = take(PackedLoader(src, 2, 64, seed=6), 10)
  assert_batches_equal(a, b)
  assert any(not np.array_equal(x["tokens"], y["tokens"]) for x, y in zip(a, c))


@pytest.mark.parametrize("split_at", [1, 7, 13])
def test_resume_equals_uninterrupted(split_at):
  src = make_source(np.random.default_rng(2).integers(1, 50, size=30).tolist() + [80])
  straight = PackedLoader(src, 3, 64, seed=9)
  want = take(straight, split_at + 6)

  first = PackedLoader(src, 3, 64, seed=9)
  take(first, split_at)
  state = json.loads(json.dumps(first.get_state()))  # JSON-serialisable
  resumed = PackedLoader(src, 3, 64, seed=9)
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 6), want[split_at:])
  assert resumed.stats == straight.stats
  assert resumed.get_state() == straight.get_state()


def test_set_state_rejects_other_order():
  src = make_source([3, 4, 5])
  state = PackedLoader(src, 1, 8, seed=1).get_state()
  with pytest.raises(ValueError, match="seed"):
    PackedLoader(src, 1, 8, seed=2).set_state(state)
  with pytest.raises(ValueError, match="num_examples"):
    PackedLoader(src + src, 1, 8, seed=1).set_state(state)


def test_too_long_truncate_skip_error_counts():
  src = make_source([4, 12, 3, 9, 2])  # examples 1 and 3 are longer than seq_len=8
  trunc = PackedLoader(src, 2, 8, seed=0, shuffle=False, too_long="truncate")
  b = next(trunc)
  # row 0 = ex0; ex1 cut to 8 tokens does not fit the rest of it -> row 1 = ex1[:8].
  np.testing.assert_array_equal(b["tokens"][0], [1, 2, 3, 4, 0, 0, 0, 0])
  np.testing.assert_array_equal(b["tokens"][1], 1001 + np.arange(8))
  np.testing.assert_array_equal(b["segment_ids"][1], [1] * 8)
  assert trunc.stats == {"examples": 2, "truncated": 1, "skipped": 0}
  next(trunc)  # ex2 + ex3[:8] don't share a row -> row 0 = ex2, row 1 = ex3[:8]
  assert trunc.stats == {"examples": 4, "truncated": 2, "skipped": 0}

  skip = PackedLoader(src, 1, 8, seed=0, shuffle=False, too_long="skip")
  b = next(skip)  # ex0 (4), ex1 skipped, ex2 (3) -> 7 tokens; ex3 skipped, ex4 (2) does not fit
  np.testing.assert_array_equal(b["tokens"][0], [1, 2, 3, 4, 2001, 2002, 2003, 0])
  assert skip.stats == {"examples": 2, "truncated": 0, "skipped": 2}
  b = next(skip)
  np.testing.assert_array_equal(b["tokens"][0], [4001, 4002, 1, 2, 3, 4, 0, 0])
  assert skip.stats == {"examples": 4, "truncated": 0, "skipped": 3}

  err = PackedLoader(src, 2, 8, seed=0, shuffle=False, too_long="error")
  with pytest.raises(ValueError, match=r"example 1 .* 12 tokens.*seq_len=8"):
    next(err)


def test_bad_sources_and_arguments():
  with pytest.raises(ValueError, match="zero examples"):
    PackedLoader([], 2, 8, seed=0)
  with pytest.raises(ValueError, match="too_long"):
    PackedLoader(make_source([3]), 2, 8, seed=0, too_long="drop")
  everything_too_long = PackedLoader(make_source([9, 10]), 2, 8, seed=0, too_long="skip")
  with pytest.raises(ValueError, match="every example"):
    next(everything_too_long)


class CountingSource:
  """A source that records how it is read."""

  def __init__(self, examples):
    self.examples, self.bulk_calls, self.single_calls = examples, 0, 0

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    self.single_calls += 1
    return self.examples[i]

  def __getitems__(self, indices):
    self.bulk_calls += 1
    return [self.examples[i] for i in indices]


@pytest.mark.parametrize("cache_limit,fetch_size", [(10_000, 512), (0, 16)])
def test_bulk_reads_and_cache_do_not_change_batches(cache_limit, fetch_size):
  examples = make_source(np.random.default_rng(3).integers(1, 30, size=100).tolist())
  counting = CountingSource(examples)
  got = take(PackedLoader(counting, 4, 64, seed=2, cache_limit=cache_limit,
                          fetch_size=fetch_size), 20)
  want = take(PackedLoader(examples, 4, 64, seed=2), 20)
  assert_batches_equal(got, want)
  assert counting.single_calls == 0
  if cache_limit:  # everything read once per example, in a few bulk reads
    assert counting.bulk_calls <= 3
  else:
    assert counting.bulk_calls < 100


def test_batches_are_game_records_under_jit():
  src = make_source([5, 6, 7, 3])
  batch = next(PackedLoader(src, 2, 12, seed=0, shuffle=False))
  record = GameRecord(**{k: jax.numpy.asarray(v) for k, v in batch.items()})
  weights = jax.jit(lambda r: next_token_weights(r, ("agent",)))(record)
  # every AGENT token that is not a segment's first token is predicted by the position before it
  want = np.zeros_like(batch["tokens"], np.float32)
  agent_next = (batch["players"][:, 1:] == AGENT) & (batch["positions"][:, 1:] > 0)
  want[:, :-1] = agent_next
  np.testing.assert_array_equal(np.asarray(weights), want)


class RecordingSource(CountingSource):
  """A source that records which examples it is asked for."""

  def __init__(self, examples):
    super().__init__(examples)
    self.read = []

  def __getitem__(self, i):
    self.read.append(int(i))
    return super().__getitem__(i)

  def __getitems__(self, indices):
    self.read.extend(int(i) for i in indices)
    return super().__getitems__(indices)


def _prompt_examples(n):
  """Example i: an opponent's opening move of 1 + i % 3 tokens, then the agent's answer."""
  out = []
  for i in range(n):
    k = 1 + i % 3
    out.append({"tokens": np.arange(100 * i + 1, 100 * i + 1 + k + 2, dtype=np.int32),
                "players": np.array([OPPONENT] * k + [AGENT] * 2, np.int8)})
  return out



class MeasuredSource(RecordingSource):
  """A recording source that also knows its examples' lengths (as ``sources.Source`` does)."""

  def lengths(self):
    return np.array([len(ex["tokens"]) for ex in self.examples])


@pytest.mark.parametrize("kind", ["prompts", "demonstrations", "pairs", "packed",
                                  "packed_measured"])
def test_processes_read_their_rows_and_together_make_the_one_process_batch(kind):
  """Two "processes", each restricted to half of every batch's rows (``only_rows``): the halves
  put together are the one-process batches, batch after batch and across epochs; where rows are
  examples of their own (prompts, pairs), each reads only its rows' examples."""
  from gamejax.data.pairs import PairLoader
  from gamejax.data.prompts import DemonstrationLoader, PromptLoader
  import test_pairs
  n, batch = 10, 4
  examples = test_pairs._toy(n) if kind == "pairs" else _prompt_examples(n)
  make = {"prompts": lambda src: PromptLoader(src, batch, 4, seed=1),
          "demonstrations": lambda src: DemonstrationLoader(src, batch, 4, seed=1, seq_len=8),
          "pairs": lambda src: PairLoader(src, batch // 2, 8, seed=1),
          "packed": lambda src: PackedLoader(src, batch, 8, seed=1),
          "packed_measured": lambda src: PackedLoader(src, batch, 8, seed=1)}[kind]
  recording = MeasuredSource if kind == "packed_measured" else RecordingSource
  whole = make(examples)
  halves, sources = [], []
  for rows in (slice(0, batch // 2), slice(batch // 2, batch)):
    source = recording(examples)
    loader = make(source)
    loader.only_rows(rows)
    halves.append(loader)
    sources.append(source)
  own_reads = kind in ("prompts", "demonstrations", "packed_measured")
  used = [set(), set()]                  # the examples each half's rows hold
  for _ in range(7):                                     # 28 rows: past two epochs of 10
    want = next(whole)
    got = []
    for half, source, seen in zip(halves, sources, used):
      before = len(source.read)
      g = next(half)
      got.append(g)
      here = set(g.get("example", np.zeros(0, int)).tolist())
      if kind.startswith("packed"):      # example i's tokens start at 100 i + 1
        first = (g["positions"] == 0) & (g["segment_ids"] > 0)
        here = set(((g["tokens"][first] - 1) // 100).tolist())
      if own_reads:                      # this batch read nothing but its own rows' examples
        assert set(source.read[before:]) <= here, (source.read[before:], here)
      seen.update(here)
    for key in want:
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key], key)
  assert halves[0].get_state() == halves[1].get_state() == whole.get_state()
  for source in sources:                 # nothing read twice
    assert len(source.read) == len(set(source.read))
  if own_reads:
    for source, half in zip(sources, used):
      assert set(source.read) == half
