"""Held-out evaluation in the arithmetic arena: exact-match accuracy of the agent's greedy answers.

The agent is prompted with the opponent's move of each held-out record (BOS + question), answers
greedily with the KV-cached decoder, and the answer is graded by the arena's verifiable judge.
Scripted players are graded on the very same problems, so the figures compare.
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from gamejax import sampling
from gamejax.data.prompts import opening_move
from gamejax.data.tokenizer import ByteTokenizer, EOS
from gamejax.games import arithmetic
from gamejax.models import llama


def problem_of(example: dict) -> arithmetic.Problem:
  op = example["op"]
  op = op.decode() if isinstance(op, bytes) else str(op)
  return arithmetic.Problem(int(example["a"]), int(example["b"]), op)


def answer_budget(params: dict) -> int:
  """The agent's longest move in the arena built with ``params`` (tokens, EOS included)."""
  cfg = arithmetic.ArenaConfig(min_digits=params.get("min_digits", 1),
                               max_digits=params.get("max_digits", 3), pad=params.get("pad", True))
  return arithmetic.turns(cfg, params.get("worked", True)).max_move("agent")


def agent_accuracy(cfg: llama.LlamaConfig, params: Any, examples: Sequence[dict],
                   max_new_tokens: int = 64, batch_size: int = 256) -> dict:
  """Greedy exact-match accuracy and partial credit of the model on arena examples."""
  tok = ByteTokenizer()
  prompts = [opening_move(e["tokens"], e["players"]) for e in examples]
  width = max(len(p) for p in prompts)
  generate = sampling.make_generate(cfg, max_new_tokens, temperature=0.0, eos_id=EOS)
  exact, partial, unstopped, samples = [], [], 0, []
  for start in range(0, len(examples), batch_size):
    chunk = prompts[start:start + batch_size]
    pad = batch_size - len(chunk)              # static shapes: the last batch is padded
    prompt_BP, lengths_B = sampling.left_pad(chunk + [chunk[-1]] * pad, width)
    out = jax.device_get(generate(params, prompt_BP, lengths_B, jax.random.PRNGKey(0)))
    for i in range(len(chunk)):
      row = out["tokens"][i]
      unstopped += int(EOS not in row)
      text = tok.decode_until_eos(row)
      problem = problem_of(examples[start + i])
      ok, credit = arithmetic.grade(problem, text)
      exact.append(ok)
      partial.append(credit)
      if len(samples) < 3:
        samples.append(tok.decode(chunk[i]) + text)
  return {"accuracy": float(np.mean(exact)), "partial_credit": float(np.mean(partial)),
          "n": len(examples), "no_stop_token": unstopped, "samples": samples}


def player_accuracy(spec: str, examples: Sequence[dict], seed: int = 0) -> dict:
  """A scripted player's exact-match accuracy on the same held-out problems."""
  player = arithmetic.parse_player(spec)
  problems = [problem_of(e) for e in examples]
  return {"player": spec, "accuracy": float(arithmetic.player_accuracy(player, problems, seed)),
          "n": len(problems)}
