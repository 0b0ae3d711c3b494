"""Tests for gamejax.games.arithmetic against hand-worked examples and independent references."""
import re
import zlib

import numpy as np
import pytest

from gamejax.data.tokenizer import BOS, EOS, ByteTokenizer
from gamejax.games import arithmetic as ar
from gamejax.records import AGENT, OPPONENT

STEP_RE = re.compile(r"([0-9])([+-])([0-9])\2([0-9])=([0-9])([0-9])")
TOK = ByteTokenizer()


def _digits_lsb(n, cols):
  return [(n // 10**i) % 10 for i in range(cols)]


def _problems(n, seed=0, cfg=ar.ArenaConfig(), split="train"):
  return ar.sample_problems(np.random.default_rng(seed), cfg, n, split)


# ---------------------------------------------------------------- independent references

def _numbers_with_digits(d):
  return np.arange(0 if d == 1 else 10**(d - 1), 10**d, dtype=np.int64)


def _expected_drop_carry_accuracy(col, cfg):
  """Exact accuracy of drop_carry:col: addition is wrong iff (a % m + b % m) >= m, m = 10**(col+1)."""
  m = 10**(col + 1)
  ds = range(cfg.min_digits, cfg.max_digits + 1)
  p_carry = np.mean([np.mean((_numbers_with_digits(da)[:, None] % m
                              + _numbers_with_digits(db)[None, :] % m) >= m)
                     for da in ds for db in ds])
  p_add = cfg.ops.count("+") / len(cfg.ops)
  return 1.0 - p_add * p_carry


def _expected_slip_accuracy(p, cfg):
  """Each of the max(da, db) columns slips independently with probability p."""
  ds = range(cfg.min_digits, cfg.max_digits + 1)
  return float(np.mean([(1 - p)**max(da, db) for da in ds for db in ds]))


def _band(p, n, sigmas=4.5):
  return sigmas * np.sqrt(p * (1 - p) / n) + 1e-9


# ---------------------------------------------------------------- problems and config

def _qa(a, b, op):
  p = ar.Problem(a, b, op)
  return p.question, p.answer


def test_problem_basics_and_validation():
  assert _qa(123, 456, "+") == ("123+456=", 579)
  assert _qa(503, 78, "-") == ("503-78=", 425)
  assert _qa(0, 0, "-") == ("0-0=", 0)
  assert ar.Problem(np.int64(7), np.int64(3), "-").question == "7-3="
  with pytest.raises(ValueError, match="a >= b"):
    ar.Problem(3, 7, "-")
  with pytest.raises(ValueError, match=r"'\*'"):
    ar.Problem(3, 7, "*")
  with pytest.raises(ValueError, match="non-negative"):
    ar.Problem(-1, 7, "+")


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_digits=0), "min_digits"), (dict(min_digits=3, max_digits=2), "max_digits"),
    (dict(max_digits=19), "max_digits"), (dict(ops=("*",)), "ops"), (dict(ops=()), "ops"),
    (dict(test_fraction=1.5), "test_fraction")])
def test_config_rejects_bad_values(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ar.ArenaConfig(**kwargs)


def test_sample_problems_distribution_and_split():
  ps = _problems(3000, seed=1)
  counts = {}
  for p in ps:
    for n in (p.a, p.b):
      assert str(n) == str(int(str(n)))  # no leading zeros
      counts[len(str(n))] = counts.get(len(str(n)), 0) + 1
    assert p.op in "+-" and (p.op == "+" or p.a >= p.b)
    assert zlib.crc32(p.question.encode()) % 1000 >= 100  # train = not test, independently
  # Digit counts uniform over {1, 2, 3}; ops equally likely.
  assert set(counts) == {1, 2, 3}
  for c in counts.values():
    assert abs(c / 6000 - 1 / 3) < 0.03
  assert abs(sum(p.op == "+" for p in ps) / 3000 - 0.5) < 0.04
  assert _problems(50, seed=1) == ps[:50]  # deterministic


def test_test_split_is_unique_and_disjoint_from_train():
  cfg = ar.ArenaConfig(test_fraction=0.2)
  test = set()
  for seed in range(3):
    ps = _problems(500, seed=seed, cfg=cfg, split="test")
    assert len(set(ps)) == 500
    assert all(zlib.crc32(p.question.encode()) % 1000 < 200 for p in ps)
    test |= set(ps)
  train = set()
  for seed in range(3):
    train |= set(_problems(1500, seed=seed, cfg=cfg, split="train"))
  assert not train & test
  assert len(test) > 500  # different seeds give different test problems


def test_exhausted_or_bad_split_raises(monkeypatch):
  monkeypatch.setattr(ar, "_MAX_MISSES", 5000)  # keep the exhaustion check fast
  tiny = ar.ArenaConfig(min_digits=1, max_digits=1, ops=("+",))  # only 100 problems
  n_test = sum(ar.is_test(ar.Problem(a, b, "+"), tiny) for a in range(10) for b in range(10))
  assert len(_problems(n_test, cfg=tiny, split="test")) == n_test
  with pytest.raises(ValueError, match="test"):
    _problems(n_test + 1, cfg=tiny, split="test")
  with pytest.raises(ValueError, match="test split is empty"):
    _problems(1, cfg=ar.ArenaConfig(test_fraction=0.0), split="test")
  with pytest.raises(ValueError, match="train split is empty"):
    _problems(1, cfg=ar.ArenaConfig(test_fraction=1.0), split="train")
  with pytest.raises(ValueError, match="'valid'"):
    _problems(1, split="valid")


# ---------------------------------------------------------------- scripted players

@pytest.mark.parametrize("a, b, op, spec, text", [
    (123, 456, "+", "perfect", "3+6+0=09;2+5+0=07;1+4+0=05|579"),
    (57, 68, "+", "perfect", "7+8+0=15;5+6+1=12|125"),
    (57, 68, "+", "drop_carry:0", "7+8+0=15;5+6+0=11|115"),
    (57, 68, "+", "drop_carry:1", "7+8+0=15;5+6+1=12|25"),  # final carry (column 1) dropped
    (57, 68, "+", "drop_carry:2", "7+8+0=15;5+6+1=12|125"),  # no column 2: correct
    (95, 7, "+", "perfect", "5+7+0=12;9+0+1=10|102"),
    (5, 7, "+", "drop_carry:0", "5+7+0=12|2"),
    (503, 78, "-", "perfect", "3-8-0=15;0-7-1=12;5-0-1=04|425"),
    (503, 78, "-", "drop_carry:0", "3-8-0=15;0-7-1=12;5-0-1=04|425"),  # subtraction unaffected
    (100, 99, "-", "perfect", "0-9-0=11;0-9-1=10;1-0-1=00|1"),
    (0, 0, "+", "perfect", "0+0+0=00|0"),
])
def test_worked_solutions_by_hand(a, b, op, spec, text):
  sol = ar.parse_player(spec).solve(ar.Problem(a, b, op), np.random.default_rng(0))
  assert ar.worked_text(sol) == text
  assert ar.answer_text(sol) == text.split("|")[1]


def _check_steps(problem, sol, dropped_col=None, slip=False):
  """Recomputes every step by hand; returns the number of slipped column digits."""
  cols = max(len(str(problem.a)), len(str(problem.b)))
  assert len(sol.steps) == cols
  xs, ys = _digits_lsb(problem.a, cols), _digits_lsb(problem.b, cols)
  carry, out, slips = 0, [], 0
  for i, step in enumerate(sol.steps):
    x, op, y, c, c_out, digit = STEP_RE.fullmatch(step).groups()
    x, y, c, c_out, digit = int(x), int(y), int(c), int(c_out), int(digit)
    assert (x, op, y, c) == (xs[i], problem.op, ys[i], carry)
    if op == "+":
      true_c, true_d = divmod(x + y + c, 10)
    else:
      true_c = int(x - y - c < 0)
      true_d = x - y - c + 10 * true_c
    assert c_out == true_c
    if digit != true_d:
      assert slip
      slips += 1
    out.append(digit)
    carry = 0 if (op == "+" and i == dropped_col) else c_out
  expected = int("".join(map(str, ([carry] if carry else []) + out[::-1])))
  assert sol.answer == expected
  return slips


def test_perfect_matches_python_arithmetic():
  rng = np.random.default_rng(0)
  player = ar.parse_player("perfect")
  for p in _problems(1500, seed=2, cfg=ar.ArenaConfig(1, 7)):
    sol = player.solve(p, rng)
    assert sol.answer == (p.a + p.b if p.op == "+" else p.a - p.b)
    _check_steps(p, sol)


@pytest.mark.parametrize("col", [0, 1, 2])
def test_drop_carry_matches_closed_form(col):
  # Dropping the carry out of column col removes exactly 10**(col+1) when that carry is 1.
  m = 10**(col + 1)
  player = ar.parse_player(f"drop_carry:{col}")
  for p in _problems(1000, seed=3, cfg=ar.ArenaConfig(1, 5)):
    sol = player.solve(p, None)
    if p.op == "+":
      assert sol.answer == p.a + p.b - m * ((p.a % m + p.b % m) >= m)
    else:
      assert sol.answer == p.a - p.b
    _check_steps(p, sol, dropped_col=col)


def test_slip_changes_only_column_digits():
  rng = np.random.default_rng(0)
  always = ar.parse_player("slip:1.0")
  for p in _problems(300, seed=4):
    sol = always.solve(p, rng)
    assert _check_steps(p, sol, slip=True) == len(sol.steps)  # every digit differs from the truth
    assert sol.answer != p.answer
  # Slipped digits are uniform over the 9 wrong digits.
  p = ar.Problem(3, 4, "+")
  got = np.bincount([always.solve(p, rng).answer for _ in range(4500)], minlength=10)
  assert got[7] == 0 and np.all(np.abs(got[np.arange(10) != 7] - 500) < 5 * np.sqrt(500))


def test_accuracies_match_analytic_values():
  cfg = ar.ArenaConfig()
  problems = _problems(2000, seed=5)
  assert ar.player_accuracy("perfect", problems, seed=0) == 1.0
  exp0 = _expected_drop_carry_accuracy(0, cfg)
  assert exp0 == pytest.approx(0.775)  # 45/100 ones-digit pairs carry; half the problems add
  for spec, expected in [("drop_carry:0", exp0),
                         ("drop_carry:1", _expected_drop_carry_accuracy(1, cfg)),
                         ("slip:0.05", _expected_slip_accuracy(0.05, cfg)),
                         ("slip:0.3", _expected_slip_accuracy(0.3, cfg))]:
    acc = ar.player_accuracy(ar.parse_player(spec), problems, seed=0)
    assert abs(acc - expected) < _band(expected, len(problems)), (spec, acc, expected)
  assert ar.player_accuracy("slip:0.05", problems, 7) == ar.player_accuracy("slip:0.05", problems, 7)
  with pytest.raises(ValueError, match="at least one"):
    ar.player_accuracy("perfect", [], seed=0)


@pytest.mark.parametrize("spec", [
    "", "perfectly", "perfect:1", "drop_carry", "drop_carry:", "drop_carry:x", "drop_carry:-1",
    "drop_carry:1.5", "slip", "slip:", "slip:abc", "slip:1.5", "slip:-0.1", "slip:nan", "carry:0"])
def test_parse_player_rejects_bad_specs(spec):
  with pytest.raises(ValueError, match=re.escape(repr(spec))):
    ar.parse_player(spec)


def test_parse_player_names():
  assert ar.parse_player("perfect").name == "perfect"
  assert ar.parse_player("drop_carry:3").name == "drop_carry:3"
  assert ar.parse_player("slip:0.05").name == "slip:0.05"
  assert ar.parse_player("slip:5e-2").name == "slip:0.05"


# ---------------------------------------------------------------- answers and grading

@pytest.mark.parametrize("text, value", [
    ("579", 579), (" 579\n", None), ("3+6+0=09;2+5+0=07;1+4+0=05|579", 579), ("a|b|42", 42),
    ("a|b| 42 ", None), ("007", 7), ("-3", None), ("+3", None), ("3+6+0=09|", None), ("", None), ("|", None), ("12a", None),
    ("1_000", None), ("4 2", None), ("12|x", None), ("x=5", None), ("\u0665", None)])
def test_parse_answer(text, value):
  assert ar.parse_answer(text) == value


@pytest.mark.parametrize("text, exact, partial", [
    ("125", True, 1.0), ("0125", True, 1.0), ("7+8+0=15;5+6+1=12|125", True, 1.0),
    ("7+8+0=15;5+6+0=11|115", False, 2 / 3), ("25", False, 2 / 3), ("5", False, 1 / 3),
    ("126", False, 2 / 3), ("999", False, 0.0), ("abc", False, 0.0), ("125|", False, 0.0),
    ("1125", False, 1.0)])  # right-aligned digits all match, but the number is wrong
def test_grade_partial_credit(text, exact, partial):
  got_exact, got_partial = ar.grade(ar.Problem(57, 68, "+"), text)
  assert got_exact is exact and got_partial == pytest.approx(partial)


# ---------------------------------------------------------------- transcripts and examples

@pytest.mark.parametrize("worked", [True, False])
@pytest.mark.parametrize("spec", ["perfect", "drop_carry:0"])
@pytest.mark.parametrize("tag", [False, True, ("right: ", "wrong: ")])
def test_transcript_attribution_and_text(worked, spec, tag):
  p = ar.Problem(57, 68, "+")
  sol = ar.parse_player(spec).solve(p, None)
  tokens, players = ar.transcript(p, sol, worked, outcome_tag=tag)
  assert tokens.dtype == np.int32 and players.dtype == np.int8 and tokens.shape == players.shape
  tags = {False: ("", ""), True: ("W ", "L ")}.get(tag, tag)
  prefix = tags[0] if spec == "perfect" else tags[1]
  question = prefix + "57+68="
  answer = {("perfect", True): "7+8+0=15;5+6+1=12|125", ("perfect", False): "125",
            ("drop_carry:0", True): "7+8+0=15;5+6+0=11|115", ("drop_carry:0", False): "115"}
  n_opp = 1 + len(question)
  assert tokens[0] == BOS and tokens[-1] == EOS
  assert players.tolist() == [OPPONENT] * n_opp + [AGENT] * (len(tokens) - n_opp)
  assert TOK.decode(tokens[:n_opp]) == question
  assert TOK.decode(tokens[n_opp:]) == answer[spec, worked]
  assert TOK.decode_until_eos(tokens[1:]) == question + answer[spec, worked]


def _collect(split="train", n=300, seed=0, players=(("perfect", 1.0), ("drop_carry:0", 1.0)),
             worked=True, tag=True, cfg=ar.ArenaConfig()):
  return list(ar.generate_examples(cfg, split, n, seed, list(players), worked, tag))


def test_generate_examples_fields_and_consistency():
  examples = _collect()
  assert [k for k, _ in examples] == [f"train_{i}" for i in range(300)]
  for _, ex in examples:
    p = ar.Problem(int(ex["a"]), int(ex["b"]), ex["op"])
    assert ex["tokens"].dtype == np.int32 and ex["players"].dtype == np.int8
    assert ex["outcome"].dtype == np.int32 and ex["a"].dtype == np.int64
    assert ex["answer"].dtype == np.int64 and int(ex["answer"]) == p.answer
    assert ex["player"] in ("perfect", "drop_carry:0")
    assert not ar.is_test(p, ar.ArenaConfig())
    text = TOK.decode_until_eos(ex["tokens"][1:])
    q = p.question_text(ar.ArenaConfig().width)    # operands zero-padded to max_digits
    tag, question, reply = text[:2], text[2:2 + len(q)], text[2 + len(q):]
    assert question == f"{p.a:03d}{p.op}{p.b:03d}="
    assert ar.grade(p, reply)[0] == bool(ex["outcome"]) == (tag == "W ")
    if ex["player"] == "perfect":
      assert ex["outcome"] == 1
  # Equal weights: about half perfect; wins ~ 0.5 * 1 + 0.5 * 0.775.
  frac_perfect = np.mean([ex["player"] == "perfect" for _, ex in examples])
  assert abs(frac_perfect - 0.5) < _band(0.5, 300)
  assert abs(np.mean([ex["outcome"] for _, ex in examples]) - 0.8875) < _band(0.8875, 300)


def _same(xs, ys):
  return len(xs) == len(ys) and all(
      kx == ky and ex.keys() == ey.keys() and all(np.array_equal(ex[f], ey[f]) for f in ex)
      for (kx, ex), (ky, ey) in zip(xs, ys))


def test_generate_examples_deterministic_and_split_disjoint():
  assert _same(_collect(seed=3, n=100), _collect(seed=3, n=100))
  assert not _same(_collect(seed=3, n=100), _collect(seed=4, n=100))
  test = _collect(split="test", n=400, seed=3)
  keys = {(int(e["a"]), int(e["b"]), e["op"]) for _, e in test}
  assert len(keys) == 400  # unique test problems
  train = {(int(e["a"]), int(e["b"]), e["op"]) for _, e in _collect(n=2000, seed=3)}
  assert not keys & train
  zero = _collect(n=100, players=(("perfect", 0.0), ("slip:0.5", 2.0)), worked=False, tag=False)
  assert {e["player"] for _, e in zero} == {"slip:0.5"}
  assert all(TOK.decode(e["tokens"][1:]).startswith(f"{e['a']:03d}{e['op']}{e['b']:03d}=")
             for _, e in zero)


def test_padded_layout_solves_every_column():
  p = ar.Problem(7, 45, "+")
  sol = ar.parse_player("perfect").solve(p, None, width=3)
  assert ar.worked_text(sol) == "7+5+0=12;0+4+1=05;0+0+0=00|52"
  tokens, _ = ar.transcript(p, sol, worked=True, width=3)
  assert TOK.decode_until_eos(tokens[1:]) == "007+045=7+5+0=12;0+4+1=05;0+0+0=00|52"
  # dropping the last natural column's carry into a padded column loses it, as unpadded
  flawed = ar.parse_player("drop_carry:0").solve(ar.Problem(5, 7, "+"), None, width=3)
  assert flawed.answer == 2 and ar.worked_text(flawed).startswith("5+7+0=12;0+0+0=00")


@pytest.mark.parametrize("players, match", [
    ([], "at least one"), ([("perfect", -1.0)], "weights"), ([("perfect", 0.0)], "weights"),
    ([("oracle", 1.0)], "'oracle'")])
def test_generate_examples_rejects_bad_arguments(players, match):
  with pytest.raises(ValueError, match=match):
    ar.generate_examples(ar.ArenaConfig(), "train", 5, 0, players, True, False)
  with pytest.raises(ValueError, match="'dev'"):
    ar.generate_examples(ar.ArenaConfig(), "dev", 5, 0, [("perfect", 1.0)], True, False)


@pytest.mark.parametrize("worked,tag,pad", [(True, False, True), (False, True, True), (True, True, False),
                                            (True, ("right ", "wrong "), True)])
def test_transcripts_follow_the_arena_turns(worked, tag, pad):
  cfg = ar.ArenaConfig(max_digits=3, pad=pad)
  structure = ar.turns(cfg, worked, tag)
  lengths = []
  for _, ex in ar.generate_examples(cfg, "train", 300, 0, [("perfect", 1.0), ("slip:0.3", 1.0),
                                                           ("drop_carry:2", 1.0)], worked, tag):
    structure.check(ex["tokens"], ex["players"])
    lengths.append(len(ex["tokens"]))
  # the bound is tight: 999+999 (final carry) uses every token of both turns
  sol = ar.parse_player("perfect").solve(ar.Problem(999, 999, "+"), None, cfg.width)
  tokens, players = ar.transcript(ar.Problem(999, 999, "+"), sol, worked, tag, cfg.width)
  assert len(tokens) == structure.max_len
  structure.check(tokens, players)
  with pytest.raises(ValueError, match="allows"):
    structure.check(list(tokens) + [5], list(players) + [players[-1]])
  with pytest.raises(ValueError, match="turn 0 is the opponent's"):
    structure.check(tokens, [3 - p for p in players])


@pytest.mark.parametrize("tags, message", [
    ("W ", "expected True, False or a pair"), (("W ",), "expected True, False or a pair"),
    (("", "L "), "not a non-empty text"), (("W ", "L\u00e9"), "printable ASCII"),
    (("W\n", "L "), "printable ASCII"), (("right=", "wrong"), "arena's own characters"),
    (("W1", "L"), "arena's own characters"), (("ok", "ok?"), "prefix"), (("W", "W"), "prefix")])
def test_bad_outcome_tags_are_refused(tags, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    ar.outcome_tags(tags)
