"""Arithmetic arena: an opponent poses "a+b=" / "a-b=" problems, scripted players answer.

Problems are split into train and held-out test by a stable hash of their question text, so the
two never overlap whatever the seed. Scripted players solve column by column (least significant
column first) and have measurable accuracies: ``perfect`` (1.0), ``drop_carry:C`` (a systematic
flaw: the carry out of column ``C`` in addition is forgotten; ~0.78 for ``C=0`` with ops ``+,-``)
and ``slip:P`` (each column's digit is randomly wrong with probability ``P``).

>>> sol = parse_player("perfect").solve(Problem(123, 456, "+"), np.random.default_rng(0))
>>> worked_text(sol)
'3+6+0=09;2+5+0=07;1+4+0=05|579'
>>> answer_text(parse_player("drop_carry:0").solve(Problem(57, 68, "+"), None))
'115'
"""
from __future__ import annotations

import dataclasses
import re
import zlib
from typing import Iterator, Sequence

import numpy as np

from gamejax.data.tokenizer import BOS, EOS, ByteTokenizer
from gamejax.games.base import Turn, Turns
from gamejax.records import AGENT, OPPONENT

OPS = ("+", "-")
SPLITS = ("train", "test")
MAX_DIGITS = 18  # operands and answers must fit int64
_MAX_MISSES = 50_000  # consecutive rejected draws before sampling gives up (split exhausted)
_TOKENIZER = ByteTokenizer()
_DIGITS_RE = re.compile(r"[0-9]+")
# Outcome tags (question-condition-answer records): the opponent's move opens with the first when
# the answer that follows is right, with the second when it is wrong.
OUTCOME_TAGS = ("W ", "L ")
_ARENA_SYNTAX = set("0123456789+-=|;")


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem; subtraction requires ``a >= b`` so that answers are non-negative.

  >>> Problem(123, 45, "-").question, Problem(123, 45, "-").answer
  ('123-45=', 78)
  """
  a: int
  b: int
  op: str

  def __post_init__(self):
    object.__setattr__(self, "a", int(self.a))
    object.__setattr__(self, "b", int(self.b))
    if self.op not in OPS:
      raise ValueError(f"Problem op {self.op!r} is not one of {OPS}")
    if self.a < 0 or self.b < 0:
      raise ValueError(f"Problem operands must be non-negative, got a={self.a}, b={self.b}")
    if self.op == "-" and self.a < self.b:
      raise ValueError(f"subtraction Problem needs a >= b, got {self.a}-{self.b}")

  @property
  def answer(self) -> int:
    return self.a + self.b if self.op == "+" else self.a - self.b

  @property
  def question(self) -> str:
    return f"{self.a}{self.op}{self.b}="

  def question_text(self, width: int = 0) -> str:
    """The opponent's move; operands zero-padded to ``width`` digits (0: unpadded).

    >>> Problem(7, 45, "+").question_text(3)
    '007+045='
    """
    return f"{self.a:0{width}d}{self.op}{self.b:0{width}d}="


@dataclasses.dataclass(frozen=True)
class ArenaConfig:
  """Problem distribution and train/test split; see module docstring."""
  min_digits: int = 1
  max_digits: int = 3
  ops: tuple[str, ...] = OPS
  test_fraction: float = 0.1
  pad: bool = True      # zero-pad operands to max_digits and solve every column: fixed layout

  @property
  def width(self) -> int:
    return self.max_digits if self.pad else 0

  def __post_init__(self):
    object.__setattr__(self, "ops", tuple(self.ops))
    if not 1 <= self.min_digits <= self.max_digits <= MAX_DIGITS:
      raise ValueError(f"ArenaConfig needs 1 <= min_digits <= max_digits <= {MAX_DIGITS}, got "
                       f"min_digits={self.min_digits}, max_digits={self.max_digits}")
    if not self.ops or any(op not in OPS for op in self.ops):
      raise ValueError(f"ArenaConfig ops {self.ops!r} must be a non-empty subset of {OPS}")
    if not 0.0 <= self.test_fraction <= 1.0:
      raise ValueError(f"ArenaConfig test_fraction={self.test_fraction} is not in [0, 1]")


def is_test(problem: Problem, cfg: ArenaConfig) -> bool:
  """Whether ``problem`` belongs to the held-out test split (stable hash of its question)."""
  return zlib.crc32(problem.question.encode("ascii")) % 1000 < cfg.test_fraction * 1000


def _random_number(rng: np.random.Generator, digits: int) -> int:
  lo = 0 if digits == 1 else 10**(digits - 1)
  return int(rng.integers(lo, 10**digits))


def _random_problem(rng: np.random.Generator, cfg: ArenaConfig) -> Problem:
  op = cfg.ops[int(rng.integers(len(cfg.ops)))]
  da, db = (int(d) for d in rng.integers(cfg.min_digits, cfg.max_digits + 1, size=2))
  a, b = _random_number(rng, da), _random_number(rng, db)
  if op == "-" and a < b:
    a, b = b, a
  return Problem(a, b, op)


def _check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  return split


def problem_stream(rng: np.random.Generator, cfg: ArenaConfig, split: str) -> Iterator[Problem]:
  """Endless problems of ``split`` (rejection sampling); test problems never repeat."""
  want_test, seen, misses, found = split == "test", set(), 0, 0
  if cfg.test_fraction == (0.0 if want_test else 1.0):
    raise ValueError(f"the {split} split is empty: test_fraction={cfg.test_fraction}")
  while True:
    p = _random_problem(rng, cfg)
    if is_test(p, cfg) == want_test and not (want_test and p in seen):
      if want_test:
        seen.add(p)
      misses, found = 0, found + 1
      yield p
    else:
      misses += 1
      if misses > _MAX_MISSES:
        raise ValueError(f"cannot draw more {split} problems from {cfg} after {found}: the "
                         f"{split} split is exhausted or empty (check digits and test_fraction)")


def sample_problems(rng: np.random.Generator, cfg: ArenaConfig, n: int, split: str) -> list[Problem]:
  """``n`` problems of ``split`` ("train" or "test"; test problems are unique).

  >>> ps = sample_problems(np.random.default_rng(0), ArenaConfig(), 3, "test")
  >>> all(is_test(p, ArenaConfig()) for p in ps)
  True
  """
  stream = problem_stream(rng, cfg, _check_split(split))
  return [next(stream) for _ in range(n)]


@dataclasses.dataclass(frozen=True)
class Solution:
  steps: tuple[str, ...]
  answer: int


def _digits(n: int) -> list[int]:
  """Digits of ``n``, least significant first (``0`` -> ``[0]``)."""
  return [int(ch) for ch in reversed(str(n))]


@dataclasses.dataclass(frozen=True)
class ScriptedPlayer:
  """A column-by-column solver: kind "perfect", "drop_carry" (param C) or "slip" (param P)."""
  name: str
  kind: str
  param: int | float = 0

  def solve(self, problem: Problem, rng: np.random.Generator | None, width: int = 0) -> Solution:
    """Solves ``problem`` over at least ``width`` columns; ``rng`` is only used by ``slip``."""
    xs, ys = _digits(problem.a), _digits(problem.b)
    cols = max(len(xs), len(ys), width)
    xs, ys = xs + [0] * (cols - len(xs)), ys + [0] * (cols - len(ys))
    steps, out, carry = [], [], 0
    for i, (x, y) in enumerate(zip(xs, ys)):
      if problem.op == "+":
        total = x + y + carry
        carry_out, digit = total // 10, total % 10
      else:
        diff = x - y - carry
        carry_out = int(diff < 0)
        digit = diff + 10 * carry_out
      if self.kind == "slip" and rng.random() < self.param:
        digit = (digit + int(rng.integers(1, 10))) % 10  # uniform over the 9 other digits
      steps.append(f"{x}{problem.op}{y}{problem.op}{carry}={carry_out}{digit}")
      out.append(digit)
      carry = carry_out
      if self.kind == "drop_carry" and problem.op == "+" and i == self.param:
        carry = 0
    if carry:  # a final addition carry becomes the leading digit
      out.append(carry)
    return Solution(tuple(steps), int("".join(str(d) for d in reversed(out))))


_PLAYER_FORMS = "'perfect', 'drop_carry:C' (integer C >= 0) or 'slip:P' (0 <= P <= 1)"


def parse_player(spec: str) -> ScriptedPlayer:
  """Parses a player spec.

  >>> parse_player("drop_carry:0").name, parse_player("slip:5e-2").name
  ('drop_carry:0', 'slip:0.05')
  """
  def bad(why: str) -> ValueError:
    return ValueError(f"bad player spec {spec!r}: {why}; expected {_PLAYER_FORMS}")

  if not isinstance(spec, str):
    raise bad("not a string")
  kind, sep, arg = spec.strip().partition(":")
  if kind == "perfect" and not sep:
    return ScriptedPlayer("perfect", "perfect")
  if kind == "drop_carry" and sep:
    if not re.fullmatch(r"[0-9]+", arg.strip()):
      raise bad(f"column {arg!r} is not a non-negative integer")
    return ScriptedPlayer(f"drop_carry:{int(arg)}", "drop_carry", int(arg))
  if kind == "slip" and sep:
    try:
      p = float(arg)
    except ValueError:
      raise bad(f"probability {arg!r} is not a number") from None
    if not 0.0 <= p <= 1.0:  # also rejects nan
      raise bad(f"probability {p} is not in [0, 1]")
    return ScriptedPlayer(f"slip:{p!r}", "slip", p)
  raise bad("unknown player or missing/extra ':' argument")


def outcome_tags(outcome_tag) -> tuple[str, str] | None:
  """The (right, wrong) tags of ``outcome_tag``: False -> None (untagged records), True ->
  ``OUTCOME_TAGS``, or a pair of texts, checked: each non-empty printable ASCII (the byte
  tokenizer's one-token-per-character alphabet), free of the arena's own characters (digits,
  ``+-=|;``), and neither a prefix of the other, so a record's tag reads back unambiguously.

  >>> outcome_tags(True), outcome_tags(("right: ", "wrong: "))
  (('W ', 'L '), ('right: ', 'wrong: '))
  >>> outcome_tags(("ok", "ok?"))
  Traceback (most recent call last):
  ...
  ValueError: outcome tags ('ok', 'ok?'): 'ok' is a prefix of 'ok?'; a record's tag must read back unambiguously
  """
  if outcome_tag is False or outcome_tag is None:
    return None
  if outcome_tag is True:
    return OUTCOME_TAGS
  if not isinstance(outcome_tag, (tuple, list)) or len(outcome_tag) != 2:
    raise ValueError(f"outcome tags {outcome_tag!r}: expected True, False or a pair of texts "
                     "(right, wrong)")
  tags = tuple(outcome_tag)
  for tag in tags:
    if not isinstance(tag, str) or not tag:
      raise ValueError(f"outcome tags {tags!r}: {tag!r} is not a non-empty text")
    bad = sorted({ch for ch in tag if not (" " <= ch <= "~")})
    if bad:
      raise ValueError(f"outcome tags {tags!r}: {tag!r} has characters outside the tokenizer's "
                       f"printable ASCII alphabet: {bad}")
    clash = sorted(set(tag) & _ARENA_SYNTAX)
    if clash:
      raise ValueError(f"outcome tags {tags!r}: {tag!r} uses the arena's own characters {clash}")
  right, wrong = tags
  for a, b in ((right, wrong), (wrong, right)):
    if b.startswith(a):
      raise ValueError(f"outcome tags {tags!r}: {a!r} is a prefix of {b!r}; a record's tag must "
                       "read back unambiguously")
  return tags


def tag_len(outcome_tag) -> int:
  """Tokens of the longest tag (0 for untagged records)."""
  tags = outcome_tags(outcome_tag)
  return max(len(t) for t in tags) if tags else 0


def turns(cfg: ArenaConfig, worked: bool = True, outcome_tag=False) -> Turns:
  """The arena's turn structure: the opponent poses (BOS + [tag +] question), the agent answers
  (+ EOS).

  >>> turns(ArenaConfig(max_digits=3)).turns
  (Turn(player='opponent', max_len=9), Turn(player='agent', max_len=32))
  """
  question = 1 + tag_len(outcome_tag) + 2 * cfg.max_digits + 2
  cols = cfg.max_digits
  answer = (cols + 1) + 1                       # digits (with a final carry) + EOS
  if worked:
    answer += 8 * cols + (cols - 1) + 1         # "x+y+c=kd" per column, ';' between, '|'
  return Turns((Turn("opponent", question), Turn("agent", answer)))


def worked_text(solution: Solution) -> str:
  """Steps then answer: ``"3+6+0=09;2+5+0=07;1+4+0=05|579"``."""
  return ";".join(solution.steps) + "|" + answer_text(solution)


def answer_text(solution: Solution) -> str:
  return str(solution.answer)


def parse_answer(text: str) -> int | None:
  """The integer written with digits only after the last '|' (or as the whole text), or None.

  Answers are non-negative; a sign, a space or any other character makes the answer unreadable,
  exactly as for the jitted judge (``gamejax.players.judges.arena_judge``).

  >>> parse_answer("3+6+0=09|9"), parse_answer("042"), parse_answer(" 42"), parse_answer("4 2")
  (9, 42, None, None)
  """
  part = text.rsplit("|", 1)[-1]
  return int(part) if _DIGITS_RE.fullmatch(part) else None


def answer_digits(answer: int, width: int) -> np.ndarray:
  """``int32[width]``: the answer's decimal digits right-aligned, -1 before them (the judge's key).

  >>> answer_digits(75, 4).tolist()
  [-1, -1, 7, 5]
  """
  digits = [int(c) for c in str(int(answer))]
  if answer < 0 or len(digits) > width:
    raise ValueError(f"answer {answer} does not fit {width} non-negative digits")
  return np.asarray([-1] * (width - len(digits)) + digits, np.int32)


def grade(problem: Problem, text: str) -> tuple[bool, float]:
  """``(exact, partial)``; partial = fraction of the answer's digits matched, right-aligned.

  >>> grade(Problem(57, 68, "+"), "7+8+0=15;5+6+0=11|115")
  (False, 0.6666666666666666)
  """
  got = parse_answer(text)
  if got is None:
    return False, 0.0
  want, have = str(problem.answer), str(got)
  matched = sum(1 for i in range(1, len(want) + 1) if i <= len(have) and have[-i] == want[-i])
  return got == problem.answer, matched / len(want)


def _won(problem: Problem, solution: Solution) -> bool:
  return solution.answer == problem.answer


def transcript(problem: Problem, solution: Solution, worked: bool,
               outcome_tag=False, width: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens int32[L], players int8[L])``: BOS + question by OPPONENT, answer + EOS by AGENT.

  With ``outcome_tag`` (True: "W "/"L ", or a pair of texts, ``outcome_tags``) the question is
  prefixed with the right or the wrong tag (whether ``solution`` is right).
  """
  tags = outcome_tags(outcome_tag)
  prefix = tags[0 if _won(problem, solution) else 1] if tags else ""
  move_o = _TOKENIZER.encode(prefix + problem.question_text(width))
  move_a = _TOKENIZER.encode(worked_text(solution) if worked else answer_text(solution))
  tokens = np.concatenate([[BOS], move_o, move_a, [EOS]]).astype(np.int32)
  players = np.full(tokens.shape, AGENT, np.int8)
  players[:1 + len(move_o)] = OPPONENT
  return tokens, players


def player_accuracy(player: ScriptedPlayer | str, problems: Sequence[Problem], seed: int) -> float:
  """Fraction of ``problems`` that ``player`` (or a spec) answers exactly."""
  if isinstance(player, str):
    player = parse_player(player)
  if not problems:
    raise ValueError("player_accuracy needs at least one problem")
  rng = np.random.default_rng(seed)
  return sum(_won(p, player.solve(p, rng)) for p in problems) / len(problems)


def generate_examples(cfg: ArenaConfig, split: str, num_examples: int, seed: int,
                      players: Sequence[tuple[str, float]], worked: bool,
                      outcome_tag) -> Iterator[tuple[str, dict]]:
  """Iterator of ``(key, example)``: a problem of ``split`` solved by a player drawn by weight.

  Deterministic given ``seed``; test problems are unique.

  >>> ex = dict(generate_examples(ArenaConfig(), "train", 2, 0, [("perfect", 1.0)], True, False))
  >>> sorted(ex["train_0"]), int(ex["train_0"]["outcome"])
  (['a', 'answer', 'b', 'op', 'outcome', 'player', 'players', 'tokens'], 1)
  """
  if not players:
    raise ValueError("generate_examples needs at least one (player spec, weight) pair")
  parsed = [parse_player(spec) for spec, _ in players]
  weights = np.asarray([w for _, w in players], np.float64)
  if not (np.all(np.isfinite(weights)) and np.all(weights >= 0) and weights.sum() > 0):
    raise ValueError(f"player weights {weights.tolist()} must be finite, >= 0, with a positive sum")
  problem_seq, player_seq = np.random.SeedSequence(
      [seed, SPLITS.index(_check_split(split))]).spawn(2)
  stream = problem_stream(np.random.default_rng(problem_seq), cfg, split)
  return _examples(stream, np.random.default_rng(player_seq), split, num_examples, parsed,
                   weights / weights.sum(), worked, outcome_tag, cfg.width)


def _examples(stream, rng, split, num_examples, parsed, weights, worked, outcome_tag, width):
  for i in range(num_examples):
    problem = next(stream)
    player = parsed[int(rng.choice(len(parsed), p=weights))]
    solution = player.solve(problem, rng, width)
    tokens, who = transcript(problem, solution, worked, outcome_tag, width)
    yield f"{split}_{i}", {
        "tokens": tokens, "players": who, "outcome": np.int32(_won(problem, solution)),
        "a": np.int64(problem.a), "b": np.int64(problem.b), "op": problem.op,
        "answer": np.int64(problem.answer), "player": player.name}
