"""The SmolLM2 experiment's task: two-digit sums asked in chat, and their verifier.

``python experiments/smollm2/arithmetic.py`` writes ``experiments/smollm2/data/sums.jsonl``: chat
records ``{"messages": [user: "What is a+b?", assistant: "a + b = c"]}`` (the answer in the form
SmolLM2-135M-Instruct writes its own), 2,000 of them from a fixed seed; local_text holds out 200
as its test split. ``verify(prompt, completion)`` is the reward: 1.0 when the last number in the
completion is the sum, else 0.0.
"""
from __future__ import annotations

import json
import os
import random
import re

QUESTION = re.compile(r"What is (\d+)\+(\d+)\?")
NUMBER = re.compile(r"-?\d+")


def verify(prompt: str, completion: str) -> float:
  """1.0 when the completion's last number is the sum the prompt asks for, else 0.0.

  >>> verify("What is 12+35?", "12 + 35 = 47"), verify("What is 12+35?", "12 + 35 = 50")
  (1.0, 0.0)
  """
  question = QUESTION.fullmatch(prompt.strip())
  if question is None:
    raise ValueError(f"not a sum question: {prompt!r}")
  numbers = NUMBER.findall(completion)
  return float(bool(numbers) and int(numbers[-1]) == int(question[1]) + int(question[2]))


def records(n: int = 2000, seed: int = 0) -> list[dict]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    out.append({"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                             {"role": "assistant", "content": f"{a} + {b} = {a + b}"}]})
  return out


if __name__ == "__main__":
  folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "sums.jsonl"), "w", encoding="utf-8") as f:
    for r in records():
      f.write(json.dumps(r) + "\n")
