"""Held-out evaluation in the arithmetic arena: exact-match accuracy of the agent's greedy answers.

The agent is prompted with the opponent's move of each held-out record (BOS + question), answers
greedily with the KV-cached decoder, and the answer is graded by the arena's verifiable judge.
Scripted players are graded on the very same problems, so the figures compare. Records that carry
their outcome (question-condition-answer) are evaluated conditioned on each outcome: the prompt's tag
replaced by the right one, then by the wrong one (``tagged_prompts``), and the answers given "wrong"
compared with the flawed players' (``reproduced_flaws``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np

from gamejax import sampling
from gamejax.data.errors import DataError
from gamejax.data.prompts import opening_move
from gamejax.data.tokenizer import ByteTokenizer
from gamejax.games import arithmetic
from gamejax.models import lm


def problem_of(example: dict) -> arithmetic.Problem:
  op = example["op"]
  op = op.decode() if isinstance(op, bytes) else str(op)
  return arithmetic.Problem(int(example["a"]), int(example["b"]), op)


def answer_budget(params: dict) -> int:
  """The agent's longest move in the arena built with ``params`` (tokens, EOS included)."""
  cfg = arithmetic.ArenaConfig(min_digits=params.get("min_digits", 1),
                               max_digits=params.get("max_digits", 3), pad=params.get("pad", True))
  return arithmetic.turns(cfg, params.get("worked", True)).max_move("agent")


def greedy_answers(cfg: lm.Config, params: Any, prompts: Sequence[np.ndarray],
                   max_new_tokens: int = 64, batch_size: int = 256,
                   tokenizer=None) -> tuple[list[str], int]:
  """The model's greedy answer text to each prompt (up to its end-of-move token, decoded by
  ``tokenizer``, the byte tokenizer by default) and how many never stopped."""
  tok = tokenizer or ByteTokenizer()
  eos = tok.eos_id
  width = max(len(p) for p in prompts)
  generate = sampling.make_generate(cfg, max_new_tokens, temperature=0.0, eos_id=eos)
  texts, unstopped = [], 0
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    pad = batch_size - len(chunk)              # static shapes: the last batch is padded
    prompt_BP, lengths_B = sampling.left_pad(chunk + [chunk[-1]] * pad, width)
    out = jax.device_get(generate(params, prompt_BP, lengths_B, jax.random.PRNGKey(0)))
    for i in range(len(chunk)):
      row = out["tokens"][i]
      unstopped += int(eos not in row)
      texts.append(tok.decode_until_eos(row))
  return texts, unstopped


def agent_accuracy(cfg: lm.Config, params: Any, examples: Sequence[dict],
                   max_new_tokens: int = 64, batch_size: int = 256,
                   prompts: Sequence[np.ndarray] | None = None) -> dict:
  """Greedy exact-match accuracy and partial credit of the model on arena examples, prompted
  with each example's opening move (or ``prompts``, one per example)."""
  tok = ByteTokenizer()
  if prompts is None:
    prompts = [opening_move(e["tokens"], e["players"]) for e in examples]
  texts, unstopped = greedy_answers(cfg, params, prompts, max_new_tokens, batch_size)
  graded = [arithmetic.grade(problem_of(e), text) for e, text in zip(examples, texts)]
  return {"accuracy": float(np.mean([ok for ok, _ in graded])),
          "partial_credit": float(np.mean([credit for _, credit in graded])),
          "n": len(examples), "no_stop_token": unstopped,
          "samples": [tok.decode(p) + t for p, t in zip(prompts[:3], texts[:3])],
          "answers": [arithmetic.parse_answer(t) for t in texts]}


def tagged_prompts(examples: Sequence[dict], tags: tuple[str, str], tag: str) -> list[np.ndarray]:
  """Each tagged example's opening move with its outcome tag (``tags[0]`` if its answer was
  right, else ``tags[1]``) replaced by ``tag``: the question conditioned on an outcome."""
  tok = ByteTokenizer()
  out = []
  for i, e in enumerate(examples):
    move = opening_move(e["tokens"], e["players"])
    old = tok.encode(tags[0] if int(e["outcome"]) else tags[1])
    if len(move) < 1 + len(old) or not np.array_equal(move[1:1 + len(old)], old):
      raise DataError(f"held-out example {i} does not open with its outcome tag "
                      f"{tok.decode(old)!r}: {tok.decode(move)!r} (were its records tagged?)")
    out.append(np.concatenate([move[:1], tok.encode(tag), move[1 + len(old):]]).astype(np.int32))
  return out


def reproduced_flaws(examples: Sequence[dict], answers: Sequence[int | None],
                     players: Mapping[str, str], seed: int = 0) -> dict:
  """For each scripted player (label -> spec): on the problems it gets wrong, the fraction where
  ``answers`` are its very answer (a flaw reproduced), and on how many problems it is wrong."""
  problems = [problem_of(e) for e in examples]
  out = {}
  for label, spec in players.items():
    player, rng = arithmetic.parse_player(spec), np.random.default_rng(seed)
    theirs = [player.solve(p, rng).answer for p in problems]
    wrong = [i for i, p in enumerate(problems) if theirs[i] != p.answer]
    out[label] = {"reproduced": float(np.mean([answers[i] == theirs[i] for i in wrong]))
                  if wrong else None, "its_errors": len(wrong)}
  return out


def player_accuracy(spec: str, examples: Sequence[dict], seed: int = 0) -> dict:
  """A scripted player's exact-match accuracy on the same held-out problems."""
  player = arithmetic.parse_player(spec)
  problems = [problem_of(e) for e in examples]
  return {"player": spec, "accuracy": float(arithmetic.player_accuracy(player, problems, seed)),
          "n": len(problems)}
