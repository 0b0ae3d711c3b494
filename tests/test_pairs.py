"""Arena preference pairs (TFDS builder) and the PairLoader that batches them as [2P, T] records."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gamejax import records
from gamejax.data import preferences, sources
from gamejax.data.errors import DataError
from gamejax.data.pairs import PairLoader
from gamejax.data.tokenizer import BOS, EOS, ByteTokenizer
from gamejax.games import arithmetic
from gamejax.models import reward
from gamejax.records import AGENT, OPPONENT

TOK = ByteTokenizer()
PREFS = dict(max_digits=2, players=[("perfect", 1.0), ("drop_carry:0", 1.0), ("slip:0.2", 1.0)],
             num_train=50, num_test=12, seed=5)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("data"))
  return {s: sources.load_source("arena_preferences", s, data_dir, **PREFS)
          for s in ("train", "test")}


def _side(ex, side):
  """(question text, agent text) of one side, checking the turn layout."""
  tokens, players = ex[f"{side}_tokens"], ex[f"{side}_players"]
  assert tokens.dtype == np.int32 and players.dtype == np.int8
  assert tokens[0] == BOS and tokens[-1] == EOS
  n_opp = int((players == OPPONENT).sum())
  assert (players[:n_opp] == OPPONENT).all() and (players[n_opp:] == AGENT).all()
  return TOK.decode(tokens[:n_opp]), TOK.decode(tokens[n_opp:])


def _problems(src):
  return [arithmetic.Problem(int(e["a"]), int(e["b"]), e["op"])
          for e in src.__getitems__(range(len(src)))]


def test_pairs_are_strictly_ordered_answers_to_one_question(splits):
  train = splits["train"]
  assert len(train) == 50 and len(splits["test"]) == 12
  assert set(train[0]) == {"chosen_tokens", "chosen_players", "rejected_tokens",
                           "rejected_players", "a", "b", "op", "answer", "chosen_player",
                           "rejected_player"}
  names = {s for s, _ in PREFS["players"]}
  for ex in train.__getitems__(range(len(train))) + splits["test"].__getitems__(range(12)):
    problem = arithmetic.Problem(int(ex["a"]), int(ex["b"]), ex["op"])
    assert int(ex["answer"]) == problem.answer
    q_c, a_c = _side(ex, "chosen")
    q_r, a_r = _side(ex, "rejected")
    assert q_c == q_r == problem.question_text(PREFS["max_digits"])
    assert arithmetic.grade(problem, a_c) > arithmetic.grade(problem, a_r)  # (exact, partial)
    assert not np.array_equal(ex["chosen_tokens"], ex["rejected_tokens"])
    assert {ex["chosen_player"], ex["rejected_player"]} <= names
    if ex["rejected_player"] == "perfect":
      pytest.fail(f"a perfect answer was rejected: {ex}")


def test_splits_disjoint_and_deterministic(splits):
  cfg = arithmetic.ArenaConfig(max_digits=2)
  train, test = _problems(splits["train"]), _problems(splits["test"])
  assert not set(train) & set(test) and len(set(test)) == len(test)
  assert not any(arithmetic.is_test(p, cfg) for p in train)
  assert all(arithmetic.is_test(p, cfg) for p in test)
  # Deterministic: regenerating gives the same pairs (TFDS stores them in its own order).
  again = preferences.generate_pairs(preferences.preferences_config(**PREFS), "train", 50)
  key = lambda ex: (ex["chosen_tokens"].tobytes(), ex["rejected_tokens"].tobytes())
  assert sorted(key(ex) for _, ex in again) == sorted(
      key(ex) for ex in splits["train"].__getitems__(range(50)))


def test_config_names_and_errors():
  a = preferences.preferences_config(players=["slip:5e-2", "perfect"], max_digits=2)
  b = preferences.preferences_config(players=[("slip:0.05", 1.0), ("perfect", 1)], max_digits=2)
  c = preferences.preferences_config(players=["slip:0.05", "perfect"], max_digits=2, seed=1)
  assert a.name == b.name != c.name and a.name.startswith("pairs_add-sub_d1-2_worked_")
  assert json.loads(a.description)["players"] == [["slip:0.05", 1.0], ["perfect", 1.0]]
  with pytest.raises(ValueError, match="bad player spec"):
    preferences.preferences_config(players=["sloppy"])
  with pytest.raises(DataError, match="num_train"):
    preferences.preferences_config(num_train=0)
  only_perfect = preferences.preferences_config(players=["perfect"], max_digits=1)
  with pytest.raises(DataError, match=r"\['perfect'\] gave equally graded answers"):
    next(preferences.generate_pairs(only_perfect, "train", 1))
  with pytest.raises(ValueError, match=r"'max_digit'.*did you mean 'max_digits'"):
    sources.load_source("arena_preferences", "train", "/nonexistent", max_digit=2)


# ----------------------------------------------------------------------------------------------
# PairLoader.

def _pair(prompt, chosen, rejected):
  def side(answer):
    return (np.array(prompt + answer, np.int32),
            np.array([OPPONENT] * len(prompt) + [AGENT] * len(answer), np.int8))
  (ct, cp), (rt, rp) = side(chosen), side(rejected)
  return {"chosen_tokens": ct, "chosen_players": cp, "rejected_tokens": rt,
          "rejected_players": rp}


def _toy(n=5):
  """Pair k: prompt [1, 10+k], chosen [20+k] * (1 + k % 3) + EOS, rejected [30+k, 31, EOS]."""
  return [_pair([1, 10 + k], [20 + k] * (1 + k % 3) + [2], [30 + k, 31, 2]) for k in range(n)]


def test_layout_chosen_rows_first():
  loader = PairLoader(_toy(), pairs_per_batch=2, seq_len=6, seed=0, shuffle=False)
  batch = next(loader)
  assert set(batch) == {"tokens", "positions", "segment_ids", "players"}
  for v in batch.values():
    assert v.shape == (4, 6) and v.dtype == np.int32
  assert batch["tokens"].tolist() == [[1, 10, 20, 2, 0, 0], [1, 11, 21, 21, 2, 0],
                                      [1, 10, 30, 31, 2, 0], [1, 11, 31, 31, 2, 0]]
  assert batch["players"].tolist() == [[2, 2, 1, 1, 0, 0], [2, 2, 1, 1, 1, 0],
                                       [2, 2, 1, 1, 1, 0], [2, 2, 1, 1, 1, 0]]
  assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 0, 0]] + [[1, 1, 1, 1, 1, 0]] * 3
  assert batch["positions"].tolist() == [[0, 1, 2, 3, 0, 0]] + [[0, 1, 2, 3, 4, 0]] * 3
  # The third batch wraps into epoch 1: pairs 4, then 0.
  next(loader)
  assert next(loader)["tokens"][:, 1].tolist() == [14, 10, 14, 10] and loader.epoch == 1


def test_each_epoch_visits_pairs_in_seeded_order():
  n, seed = 7, 3
  loader = PairLoader(_toy(n), pairs_per_batch=1, seq_len=6, seed=seed)
  seen = [int(next(loader)["tokens"][0, 1]) - 10 for _ in range(3 * n)]
  for e in range(3):
    assert seen[e * n:(e + 1) * n] == np.random.default_rng([seed, e]).permutation(n).tolist()
  assert seen[:n] != seen[n:2 * n]


@pytest.mark.parametrize("split_at", [0, 1, 4])
def test_state_round_trip_resumes_exactly(split_at):
  make = lambda: PairLoader(_toy(5), pairs_per_batch=2, seq_len=6, seed=11)
  whole = make()
  expected = [next(whole) for _ in range(6)]
  first = make()
  for _ in range(split_at):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = make()
  resumed.set_state(state)
  for want in expected[split_at:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert resumed.get_state() == whole.get_state()
  with pytest.raises(DataError, match="seed: state has 11, loader has 12"):
    PairLoader(_toy(5), pairs_per_batch=2, seq_len=6, seed=12).set_state(state)
  with pytest.raises(DataError, match="num_examples"):
    PairLoader(_toy(4), pairs_per_batch=2, seq_len=6, seed=11).set_state(state)


@pytest.mark.parametrize("bad, match", [
    (_pair([1, 10], [], [30, 2]), r"example 2 .*the chosen side has no agent tokens"),
    (_pair([1, 10], [30, 2], []), r"example 2 .*the rejected side has no agent tokens"),
    (_pair([1, 10], [30, 2], [30, 2]), r"example 2 .*chosen and rejected are identical"),
    (_pair([1, 10], [20, 2], [30, 31, 32, 33, 2]),
     r"example 2 .*the rejected side has 7 tokens, more than seq_len=6"),
    ({**_pair([1, 10], [20, 2], [30, 2]), "rejected_tokens": np.array([1, 11, 30, 2])},
     r"example 2 .*different prompts \(opponent tokens \[1, 10\] vs \[1, 11\]\)"),
    ({"chosen_tokens": [1, 2], "chosen_players": [2, 1]},
     r"example 2 .*lacks 'rejected_tokens'"),
    ({**_pair([1], [20, 2], [30, 2]), "chosen_players": np.array([2, 1])},
     r"example 2 .*chosen tokens \(3,\) and players \(2,\)"),
])
def test_bad_pairs_raise_naming_the_example(bad, match):
  source = _toy(4)
  source[2] = bad
  loader = PairLoader(source, pairs_per_batch=1, seq_len=6, seed=0, shuffle=False)
  with pytest.raises(DataError, match=match):
    for _ in range(4):
      next(loader)


def test_bad_arguments():
  with pytest.raises(DataError, match="zero preference pairs"):
    PairLoader([], pairs_per_batch=1, seq_len=8, seed=0)
  with pytest.raises(DataError, match="pairs_per_batch=0"):
    PairLoader(_toy(), pairs_per_batch=0, seq_len=8, seed=0)


def test_built_pairs_batch_into_preference_records(splits):
  seq_len = 48
  loader = PairLoader(splits["train"], pairs_per_batch=4, seq_len=seq_len, seed=0)
  batch = next(loader)
  assert batch["tokens"].shape == (8, seq_len)
  record = records.GameRecord(**{k: jnp.asarray(v) for k, v in batch.items()})
  # Scores = positions: a row's sequence score is the position of its last agent token, the EOS.
  last = jax.jit(reward.sequence_scores)(record.positions.astype(jnp.float32), record)
  lengths = (batch["segment_ids"] > 0).sum(1)
  np.testing.assert_array_equal(last, lengths - 1)
  assert (batch["tokens"][np.arange(8), lengths - 1] == EOS).all()
  for i in range(4):  # each pair: one question, two differently graded answers
    chosen, rejected = batch["tokens"][i], batch["tokens"][4 + i]
    q = lambda row, toks: toks[batch["players"][row] == OPPONENT].tolist()
    assert q(i, chosen) == q(4 + i, rejected)
    assert not np.array_equal(chosen, rejected)
