"""Red-teaming as a zero-sum language game on the arithmetic arena: an attacker LM writes problems,
a defender LM answers them, the arena's verifiable judge grades, and both learn in the same step.

Each step plays ``B`` games (``batch["games"]``):

1. the attacker (the player in the opponent's seat) writes a problem after ``<BOS>``, sampled at
   ``attacker_temperature`` up to the first ``=``, in the arena's fixed-width format
   (``"042+785="``: ``max_digits`` digits, an operator of ``ops``, ``max_digits`` digits);
2. the problem is read inside the step (``parse_problems``): well-formed when it is exactly that
   format, in range when a subtraction's result is not negative; its answer key is computed from
   the digits (``answer_keys``);
3. the defender (the player in the agent's seat) answers each problem ``group_size`` times,
   sampled at ``defender_temperature``; the record of a game is ``<BOS>`` + problem (the
   opponent's move, its tokens carrying the attacker's sampling log-probs) + answer (the agent's).

The judge (``respond_fn``) pays the defender 1 for a right answer, 0 otherwise (``agent/rewards``;
all 0 on an ill-formed problem, so a GRPO group there carries no gradient), and the attacker the
defender's loss on its problem: ``1 - mean(right answers)`` (``opponent/rewards``, one value per
problem, repeated on its ``group_size`` rows). An ill-formed or out-of-range problem costs
``-penalty``. The game is zero-sum up to a constant (what the defender wins, the attacker loses)
except for one rule that keeps the attacker from collapsing onto one problem: a problem posed
``k`` times in a batch shares its payoff (each copy earns ``1/k`` of it; ``share=True``), so
repeating a hard problem earns no more than posing it once. The number of distinct problems per
batch is logged (``redteam/distinct``).

Both seats are scored at their sampler's temperature (``score_temperature``), and the KL terms of
their payoffs read ``reference_token_logprobs`` from the frozen players named in ``references``
(seat -> player, e.g. the defender's and the attacker's starting models, ``Stage.frozen_from``).

At the end of the stage (``evaluate_run``) the final attacker writes ``eval_problems`` problems;
every defender in ``defenders`` (label -> a frozen player: the initial defender, a control) and the
final defender answer them and the held-out problems greedily. The figures say whether the
attacker's problems are harder than random ones for the initial defender, and whether co-training
made the defender better than its start and than the control on both.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gamejax import records, sampling
from gamejax.data.tokenizer import BOS, ByteTokenizer
from gamejax.evaluation import arena as arena_eval
from gamejax.games import arithmetic
from gamejax.games.base import GameConfigError, token
from gamejax.players import judges, policy, reference as reference_player

MAX_WIDTH = 9            # a + b of two 9-digit operands fits int32
_TOK = ByteTokenizer()


def problem_len(width: int) -> int:
  """Tokens of a problem: ``width`` digits, the operator, ``width`` digits, ``=``."""
  return 2 * width + 2


def parse_problems(tokens_BN: jax.Array, lengths_B: jax.Array, width: int,
                   ops: Sequence[str] = arithmetic.OPS):
  """Reads the attacker's problems inside the step.

  ``tokens_BN``: each row's move, ``lengths_B`` its token count. Returns ``(valid bool[B],
  a int32[B], b int32[B], minus bool[B])``: a row is valid when its move is exactly
  ``width`` digits, one operator of ``ops``, ``width`` digits and ``=``, and a subtraction has
  ``a >= b`` (the arena's answers are non-negative).

  >>> t = jnp.asarray([list(_TOK.encode("042+785=")), list(_TOK.encode("007-042="))])
  >>> valid, a, b, minus = parse_problems(t, jnp.asarray([8, 8]), 3)
  >>> valid.tolist(), a.tolist(), b.tolist(), minus.tolist()
  ([True, False], [42, 7], [785, 42], [False, True])
  """
  n = problem_len(width)
  if tokens_BN.shape[1] < n:
    tokens_BN = jnp.pad(tokens_BN, ((0, 0), (0, n - tokens_BN.shape[1])))
  t_BN = tokens_BN[:, :n]
  digit_BN = t_BN - token("0")
  is_digit_BN = (digit_BN >= 0) & (digit_BN <= 9)
  left, right = slice(0, width), slice(width + 1, 2 * width + 1)
  op_B = t_BN[:, width]
  plus_ok, minus_ok = ("+" in ops), ("-" in ops)
  plus_B = (op_B == token("+")) & plus_ok
  minus_B = (op_B == token("-")) & minus_ok
  powers_W = jnp.asarray([10 ** (width - 1 - i) for i in range(width)], jnp.int32)
  number = lambda d_BW: (jnp.where(d_BW >= 0, d_BW, 0) * powers_W[None, :]).sum(axis=1)
  a_B, b_B = number(digit_BN[:, left]), number(digit_BN[:, right])
  shaped_B = (jnp.asarray(lengths_B) == n) & is_digit_BN[:, left].all(axis=1) & (
      is_digit_BN[:, right].all(axis=1)) & (plus_B | minus_B) & (t_BN[:, n - 1] == token("="))
  in_range_B = ~minus_B | (a_B >= b_B)
  return shaped_B & in_range_B, a_B.astype(jnp.int32), b_B.astype(jnp.int32), minus_B


def answer_keys(answer_B: jax.Array, width: int = judges.ANSWER_WIDTH) -> jax.Array:
  """``int32[B, width]``: each non-negative answer's digits right-aligned, -1 before them (the
  arena judge's key, as ``arithmetic.answer_digits`` writes it on the host).

  >>> answer_keys(jnp.asarray([75, 0]), 4).tolist()
  [[-1, -1, 7, 5], [-1, -1, -1, 0]]
  """
  answer_B = jnp.asarray(answer_B, jnp.int32)
  place_W = width - 1 - jnp.arange(width)                     # 10^place of each slot
  scale_W = jnp.asarray([10 ** min(int(k), 9) for k in range(width - 1, -1, -1)], jnp.int32)
  digit_BW = (answer_B[:, None] // scale_W[None, :]) % 10     # int32 answers: < 10 digits
  count_B = 1 + sum((answer_B >= 10 ** k).astype(jnp.int32) for k in range(1, min(width, 10)))
  return jnp.where(place_W[None, :] < count_B[:, None], digit_BW, -1).astype(jnp.int32)


def host_problem(text: str, width: int, ops: Sequence[str] = arithmetic.OPS):
  """The problem an attacker's move ``text`` poses (``arithmetic.Problem``), or None when it is
  ill-formed or out of range: the host-side reading ``parse_problems`` is tested against."""
  m = re.fullmatch(rf"([0-9]{{{width}}})([+-])([0-9]{{{width}}})=", text)
  if m is None or m.group(2) not in ops:
    return None
  a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
  if op == "-" and a < b:
    return None
  return arithmetic.Problem(a, b, op)


def random_problems(key: jax.Array, count: int, width: int, ops: Sequence[str] = arithmetic.OPS,
                    min_digits: int = 1) -> jax.Array:
  """``int32[count, 2 * width + 2]``: problems drawn as the arena draws its own
  (``arithmetic._random_problem``: each operand's digit count uniform in ``[min_digits, width]``,
  the number uniform among those with that many digits, the operator uniform over ``ops``, a
  subtraction's operands ordered), written zero-padded: ``"042+785="``."""
  k_da, k_db, k_a, k_b, k_op = jax.random.split(key, 5)

  def number(k_digits, k_value):
    d = jax.random.randint(k_digits, (count,), min_digits, width + 1)
    lo = jnp.where(d == 1, 0, 10 ** (d - 1))
    return jax.random.randint(k_value, (count,), lo, 10 ** d)

  a, b = number(k_da, k_a), number(k_db, k_b)
  op_ids = jnp.asarray([token(op) for op in ops], jnp.int32)
  op = op_ids[jax.random.randint(k_op, (count,), 0, len(ops))]
  swap = (op == token("-")) & (a < b)
  a, b = jnp.where(swap, b, a), jnp.where(swap, a, b)
  powers_W = jnp.asarray([10 ** (width - 1 - i) for i in range(width)], jnp.int32)
  digits = lambda x: (x[:, None] // powers_W[None, :]) % 10 + token("0")
  return jnp.concatenate([digits(a), op[:, None], digits(b),
                          jnp.full((count, 1), token("="), jnp.int32)], axis=1).astype(jnp.int32)


def copies(problem_BN: jax.Array, valid_B: jax.Array) -> jax.Array:
  """``float32[B]``: how many valid problems of the batch equal each row's (>= 1 for a valid row,
  1 for an invalid one)."""
  same_BB = jnp.all(problem_BN[:, None, :] == problem_BN[None, :, :], axis=-1)
  count_B = (same_BB & valid_B[None, :]).sum(axis=1)
  return jnp.where(valid_B, jnp.maximum(count_B, 1), 1).astype(jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class RedTeamGame:
  """The red-team game on the arena (see the module docstring)."""
  max_digits: int = 3
  ops: tuple[str, ...] = arithmetic.OPS
  group_size: int = 8
  attacker_temperature: float = 1.0
  defender_temperature: float = 1.0
  penalty: float = 1.0
  share: bool = True
  worked: bool = True
  references: Mapping[str, str] = dataclasses.field(default_factory=dict)
  defenders: Mapping[str, str] = dataclasses.field(default_factory=dict)
  eval_problems: int = 500
  # The share of each step's games whose problem is drawn at random (as the arena draws them)
  # instead of written by the attacker: the defender faces a mixture of the attacker and the
  # problem distribution. Those problems' tokens are moved by CHANCE (no seat learns them).
  random_fraction: float = 0.0
  name: str = "redteam"

  def __post_init__(self):
    object.__setattr__(self, "ops", tuple(self.ops))
    if not (isinstance(self.max_digits, int) and 1 <= self.max_digits <= MAX_WIDTH):
      raise GameConfigError(f"redteam_game.max_digits={self.max_digits!r}: the attacker's "
                            f"problems are parsed inside the step with int32 digits; expected "
                            f"1 to {MAX_WIDTH}")
    if not self.ops or any(op not in arithmetic.OPS for op in self.ops):
      raise GameConfigError(f"redteam_game.ops={self.ops!r}: expected a non-empty subset of "
                            f"{arithmetic.OPS} (the judge grades only these)")
    if not (isinstance(self.group_size, int) and self.group_size >= 2):
      raise GameConfigError(f"redteam_game.group_size={self.group_size!r}: the defender answers "
                            "each problem an int >= 2 times (GRPO compares them)")
    for field in ("attacker_temperature", "defender_temperature"):
      if not getattr(self, field) > 0:
        raise GameConfigError(f"redteam_game.{field}={getattr(self, field)!r} must be > 0 "
                              "(both seats sample)")
    if not self.penalty >= 0:
      raise GameConfigError(f"redteam_game.penalty={self.penalty!r} must be >= 0 (what an "
                            "ill-formed problem costs the attacker)")
    for seat in self.references:
      records.seat_key(seat, "")
    if not 0.0 <= self.random_fraction < 1.0:
      raise GameConfigError(f"redteam_game.random_fraction={self.random_fraction!r} must be in "
                            "[0, 1) (the attacker writes the other problems)")
    if not (isinstance(self.eval_problems, int) and self.eval_problems >= 1):
      raise GameConfigError(f"redteam_game.eval_problems={self.eval_problems!r} must be an "
                            "int >= 1")

  @property
  def width(self) -> int:
    return self.max_digits

  def answer_budget(self) -> int:
    cfg = arithmetic.ArenaConfig(max_digits=self.max_digits, ops=self.ops)
    return arithmetic.turns(cfg, self.worked).max_move("agent")

  def score_temperature(self, seat: str) -> float:
    """The temperature a seat's moves are sampled and scored at."""
    return self.attacker_temperature if seat == "opponent" else self.defender_temperature

  def mask(self, apply: Callable, vocab_size: int) -> Callable:
    del vocab_size
    return apply            # any token is a move: an ill-formed problem is the attacker's loss

  def frozen_players(self) -> tuple[str, ...]:
    """The frozen players the game reads (its references and the defenders it evaluates)."""
    return tuple(dict.fromkeys([*self.references.values(), *self.defenders.values()]))

  def check(self, arena_params: Mapping[str, Any] | None) -> None:
    """A ``GameConfigError`` when the problems the attacker must write are not the arena's the
    defender learned (``arena_params``: the experiment's evaluation arena), which the judge and
    the held-out figures read."""
    if arena_params is None:
      return
    pad = arena_params.get("pad", True)
    digits = arena_params.get("max_digits", 3)
    ops = tuple(arena_params.get("ops", arithmetic.OPS))
    worked = arena_params.get("worked", True)
    if not pad or digits != self.max_digits or worked != self.worked or set(ops) != set(self.ops):
      raise GameConfigError(
          f"redteam_game: the attacker writes {self.max_digits}-digit zero-padded problems with "
          f"ops {self.ops} (worked answers: {self.worked}), but the arena the defender is "
          f"evaluated on has max_digits={digits}, pad={pad}, ops={ops}, worked={worked}; the "
          "judge reads only the fixed-width format: set redteam_game.max_digits, ops and worked "
          "to the arena's (and arena.pad=True)")
    if arena_params.get("outcome_tag"):
      raise GameConfigError("redteam_game: the defender's arena carries outcome tags; the "
                            "attacker's problems are untagged questions")

  # ---- in the step ------------------------------------------------------------------------------

  def play_fn(self, apply: Callable, seats: Mapping[str, str], player_params: Callable,
              model=None):
    """``play(state, batch, rng) -> (moves, facts)``: the attacker writes ``B`` problems, the
    defender answers each ``group_size`` times (rows group-major)."""
    del apply
    if model is None:
      raise ValueError("RedTeamGame.play_fn samples text: pass the model config (model=...)")
    n = problem_len(self.width)
    ops = self.ops
    answer = policy.sampled_play(model, self.group_size, self.answer_budget(),
                                 self.defender_temperature, player=seats["agent"])

    def play(state, batch, rng):
      b = jnp.asarray(batch["games"]).shape[0]
      k_attack, k_answer = jax.random.split(rng)
      attacker = jax.lax.stop_gradient(player_params(state, seats["opponent"]))
      start_B1 = jnp.full((b, 1), BOS, jnp.int32)
      # Every problem starts from the one prompt <BOS>: one prefill, broadcast to all B.
      out = sampling.generate(model, attacker, start_B1[:1], jnp.ones((1,), jnp.int32), n,
                              k_attack, self.attacker_temperature, stop_ids=(token("="),),
                              scaled_logprobs=True, group_size=b)
      drawn = int(round(b * self.random_fraction))        # the last `drawn` games: random
      random_B = jnp.arange(b) >= b - drawn
      if drawn:
        drawn_BN = jnp.concatenate([jnp.zeros((b - drawn, n), jnp.int32),
                                    random_problems(jax.random.fold_in(k_attack, 1), drawn,
                                                    self.width, ops)], axis=0)
        out = {**out, "tokens": jnp.where(random_B[:, None], drawn_BN, out["tokens"]),
               "mask_BN": jnp.where(random_B[:, None], 1.0, out["mask_BN"]),
               "logprobs": jnp.where(random_B[:, None], 0.0, out["logprobs"]),
               "lengths": jnp.where(random_B, n, out["lengths"])}
      mask_BN = out["mask_BN"]
      valid_B, a_B, b_B, minus_B = parse_problems(out["tokens"], out["lengths"], self.width, ops)
      answer_B = jnp.where(minus_B, a_B - b_B, a_B + b_B)
      key_BW = jnp.where(valid_B[:, None], answer_keys(answer_B), -1)
      # The defender's prompt: <BOS> + the attacker's move, left-padded; its tokens keep the
      # attacker's log-probs (the behaviour log-probs of the opponent's seat).
      real_BL = jnp.concatenate([jnp.ones((b, 1), bool), mask_BN > 0], axis=1)
      tokens_BL = jnp.concatenate([start_B1, out["tokens"]], axis=1)
      logp_BL = jnp.concatenate([jnp.zeros((b, 1), jnp.float32), out["logprobs"] * mask_BN], 1)
      prompt_BL, _, prompt_logp_BL, real_BL = policy.right_align(
          tokens_BL, jnp.zeros_like(tokens_BL), logp_BL, real_BL)
      prompts = {"prompt": prompt_BL, "prompt_lengths": real_BL.sum(axis=1).astype(jnp.int32),
                 policy.PROMPT_LOGPROBS: prompt_logp_BL, judges.ANSWER_KEY: key_BW,
                 "redteam/valid": valid_B, "redteam/problem": out["tokens"] * (mask_BN > 0),
                 "redteam/minus": minus_B,
                 "redteam/ones_carry": ~minus_B & ((a_B % 10 + b_B % 10) >= 10),
                 "redteam/random": random_B}
      moves, facts = answer(state, prompts, k_answer)
      facts = dict(facts)
      if drawn:      # a drawn problem is chance's move, not the attacker's
        chance_BT = facts["redteam/random"][:, None] & (moves.players == records.OPPONENT)
        moves = moves.replace(players=jnp.where(chance_BT, records.CHANCE, moves.players))
      facts["metrics"] = {**facts["metrics"],
                          "play/attacker_tokens": jnp.where(random_B[:, None], 0.0,
                                                            mask_BN).sum()}
      return moves, facts

    return play

  def respond_fn(self, vocab_size: int, apply_of: Callable[[str], Callable] | None = None):
    """The verifiable judge of both seats, and each seat's reference log-probs.

    ``apply_of(seat)``: the model apply that scores the seat (at its temperature); needed when
    ``references`` is not empty."""
    del vocab_size
    g = self.group_size
    if self.references and apply_of is None:
      raise ValueError("RedTeamGame.respond_fn: references need apply_of(seat)")

    def respond(state, moves, facts, rng):
      del rng
      exact_B, _ = judges.graded(moves, facts, who="redteam_game")
      valid_B = jnp.asarray(facts["redteam/valid"])
      right_B = (exact_B & valid_B).astype(jnp.float32)
      right_PG = right_B.reshape(-1, g)
      first = lambda key: jnp.asarray(facts[key]).reshape((-1, g) + facts[key].shape[1:])[:, 0]
      drawn_P = first("redteam/random")
      valid_P = first("redteam/valid")
      written_P = valid_P & ~drawn_P                  # the attacker's well-formed problems
      copies_P = copies(first("redteam/problem"), written_P)
      loss_P = 1.0 - right_PG.mean(axis=1)
      attack_P = jnp.where(valid_P, loss_P / (copies_P if self.share else 1.0), -self.penalty)
      # A drawn problem is not the attacker's: it carries the mean payoff of the attacker's own
      # (its tokens are chance's, so it adds nothing to the attacker's gradient nor its baseline).
      mine = (~drawn_P).astype(jnp.float32)
      attack_P = jnp.where(drawn_P, (attack_P * mine).sum() / jnp.maximum(mine.sum(), 1.0),
                           attack_P)
      n_valid = jnp.maximum(written_P.sum(), 1)
      on_valid = lambda x_P: jnp.where(written_P, x_P, 0.0).sum() / n_valid
      n_written = jnp.maximum(mine.sum(), 1.0)
      distinct = jnp.where(written_P, 1.0 / copies_P, 0.0).sum() / n_written
      carry_P, minus_P = first("redteam/ones_carry"), first("redteam/minus")
      out = {"agent/rewards": right_B, "opponent/rewards": jnp.repeat(attack_P, g),
             "metrics": {"redteam/valid": (written_P.astype(jnp.float32).sum() / n_written),
                         "redteam/distinct": distinct,
                         "redteam/defender_exact": on_valid(1.0 - loss_P),
                         "redteam/attacker_reward": (attack_P * mine).sum() / n_written,
                         "redteam/ones_carry": on_valid(carry_P.astype(jnp.float32)),
                         "redteam/minus": on_valid(minus_P.astype(jnp.float32)),
                         "redteam/drawn_exact": (jnp.where(drawn_P, 1.0 - loss_P, 0.0).sum()
                                                 / jnp.maximum(drawn_P.sum(), 1))}}
      if self.references:
        lp_BT = jnp.zeros(moves.tokens.shape, jnp.float32)
        for seat, name in self.references.items():
          lp_BT = lp_BT + reference_player.token_logprobs(
              apply_of(seat), state.frozen[name], moves, (seat,))
        out[reference_player.REFERENCE_TOKEN_LOGPROBS] = jax.lax.stop_gradient(lp_BT)
      return out

    return respond

  # ---- after the stage --------------------------------------------------------------------------

  def attack_problems(self, model, attacker: Any, count: int, seed: int = 0,
                      batch_size: int = 250) -> tuple[list[arithmetic.Problem], dict]:
    """``count`` problems written by ``attacker`` at its temperature; the valid ones (read on
    the host, ``host_problem``) and figures of all: valid and distinct fractions, a few
    samples."""
    n = problem_len(self.width)
    generate = sampling.make_generate(model, n, temperature=self.attacker_temperature,
                                      stop_ids=(token("="),))
    texts = []
    for start in range(0, count, batch_size):
      rows = min(batch_size, count - start)
      prompt, lengths = sampling.left_pad([np.asarray([BOS], np.int32)] * batch_size, 1)
      out = jax.device_get(generate(attacker, prompt, lengths,
                                    jax.random.fold_in(jax.random.PRNGKey(seed), start)))
      for i in range(rows):
        texts.append(_TOK.decode(out["tokens"][i][:int(out["lengths"][i])]))
    problems = [host_problem(t, self.width, self.ops) for t in texts]
    valid = [p for p in problems if p is not None]
    figures = {"written": count, "valid": len(valid) / count,
               "distinct": len(set(valid)) / count,
               "ones_carry": float(np.mean([p.op == "+" and (p.a % 10 + p.b % 10) >= 10
                                            for p in valid])) if valid else None,
               "minus": float(np.mean([p.op == "-" for p in valid])) if valid else None,
               "samples": texts[:5]}
    return valid, figures

  def evaluate_run(self, model, seats: Mapping[str, Any], frozen: Mapping[str, Any],
                   examples: Sequence[dict] | None, seed: int = 0) -> dict:
    """The final attacker's ``eval_problems`` problems; greedy exact-match accuracy on them and
    on the held-out ``examples`` of the final defender and of each of ``defenders``."""
    problems, attack = self.attack_problems(model, seats["opponent"], self.eval_problems, seed)
    budget = self.answer_budget()
    prompts = [np.concatenate([[BOS], _TOK.encode(p.question_text(self.width))]).astype(np.int32)
               for p in problems]
    players = {"defender": seats["agent"], **{label: frozen[name]
                                             for label, name in self.defenders.items()}}
    out: dict[str, Any] = {"attack": attack, "defenders": {}}
    for label, params in players.items():
      figures = {}
      if problems:
        texts, _ = arena_eval.greedy_answers(model, params, prompts, budget)
        figures["on_attack"] = float(np.mean([arithmetic.grade(p, t)[0]
                                              for p, t in zip(problems, texts)]))
      if examples is not None:
        figures["heldout"] = arena_eval.agent_accuracy(model, params, examples, budget)["accuracy"]
      out["defenders"][label] = figures
    if examples is not None:
      out["accuracy"] = out["defenders"]["defender"]["heldout"]
    return out


def redteam_game(max_digits: int = 3, ops: Sequence[str] = arithmetic.OPS, group_size: int = 8,
                 attacker_temperature: float = 1.0, defender_temperature: float = 1.0,
                 penalty: float = 1.0, share: bool = True, worked: bool = True,
                 references: Mapping[str, str] | None = None,
                 defenders: Mapping[str, str] | None = None,
                 eval_problems: int = 500, random_fraction: float = 0.0) -> RedTeamGame:
  """The red-team game from gin (see ``RedTeamGame`` and the module docstring)."""
  return RedTeamGame(max_digits=max_digits, ops=tuple(ops), group_size=group_size,
                     attacker_temperature=attacker_temperature,
                     defender_temperature=defender_temperature, penalty=penalty, share=share,
                     worked=worked, references=dict(references or {}),
                     defenders=dict(defenders or {}), eval_problems=eval_problems,
                     random_fraction=random_fraction)
