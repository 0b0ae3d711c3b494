"""A verifier as the judge: a user's Python function ``verify(prompt, completion) -> float`` named by
its import path (``"my_pkg.checks.verify"`` or ``"my_pkg.checks:verify"``), run on the host
inside the compiled step (``jax.pure_callback``).

``prompt`` is the user's words as the data has them (a local_text JSONL line's ``"prompt"``, or
the last user message before the first assistant turn of its ``"messages"``); ``completion`` is
the agent's move decoded by the experiment's tokenizer, up to its end-of-move token. A verifier
that raises, or returns something that is not a finite number, gives a NaN reward: the payoffs
count it (``nonfinite_rewards``) and the step skips that update (``skipped_nonfinite``), as it
does for any judge's non-finite reward; the step's metrics count the verifier's errors
(``judge/verifier_errors``) and the first one is logged with its message.

>>> spec = verifier("math.isfinite")
>>> resolve(spec.path)(1.0)
True
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import math
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gamejax import records
from gamejax.data.prompts import EXAMPLE

_LOG = logging.getLogger(__name__)


class VerifierError(ValueError):
  """A verifier path that does not name a callable."""


@dataclasses.dataclass(frozen=True)
class Verifier:
  """``Rollout.judge = @verifier()`` with ``verifier.path = 'pkg.module.function'``."""
  path: str
  seat: str = "agent"


def verifier(path: str, seat: str = "agent") -> Verifier:
  return Verifier(path=path, seat=seat)


def resolve(path: str) -> Callable[..., Any]:
  """The callable at ``path``: ``"pkg.mod.fn"``, ``"pkg.mod:fn"`` or ``"path/to/file.py:fn"`` (a
  file, relative to the working directory); a ``VerifierError`` says what could not be imported
  or found."""
  module_name, sep, attr = path.rpartition(":") if ":" in path else path.rpartition(".")
  if not module_name or not attr:
    raise VerifierError(f"verifier {path!r}: expected 'package.module.function' or "
                        "'file.py:function'")
  try:
    if module_name.endswith(".py"):
      module = _from_file(module_name)
    else:
      module = importlib.import_module(module_name)
  except Exception as e:                     # an import error inside the user's module too
    raise VerifierError(f"verifier {path!r}: cannot import {module_name!r} "
                        f"({type(e).__name__}: {e})") from None
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise VerifierError(f"verifier {path!r}: {module_name!r} has no function {attr!r}")
  return fn


@functools.lru_cache(maxsize=None)
def _from_file(file: str):
  import importlib.util
  full = os.path.abspath(file)
  if not os.path.isfile(full):
    raise FileNotFoundError(f"no such file {full}")
  spec = importlib.util.spec_from_file_location(
      "gamejax_verifier_" + os.path.splitext(os.path.basename(full))[0], full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def prompt_text(obj: Mapping[str, Any]) -> str:
  """The user's words of a local_text JSONL object: its ``"prompt"``, the last user message
  before the first assistant turn of its ``"messages"``, or its ``"text"``.

  >>> prompt_text({"messages": [{"role": "user", "content": "2+2?"},
  ...                           {"role": "assistant", "content": "4"}]})
  '2+2?'
  """
  if isinstance(obj.get("prompt"), str):
    return obj["prompt"]
  if isinstance(obj.get("messages"), list):
    user = ""
    for m in obj["messages"]:
      if m.get("role") == "assistant":
        break
      if m.get("role") == "user":
        user = m.get("content", "")
    return user
  return str(obj.get("text", ""))


def local_text_prompts(source, folder: str) -> Callable[[int], str]:
  """``prompt_of(index)``: the prompt text of example ``index`` of a local_text source (its
  record names the file and line it came from)."""
  @functools.lru_cache(maxsize=None)
  def lines(file: str) -> list[str]:
    with open(os.path.join(folder, file), encoding="utf-8") as f:
      return f.read().splitlines()

  @functools.lru_cache(maxsize=100_000)
  def prompt_of(index: int) -> str:
    example = source[index]
    file = example["file"]
    file = file.decode("utf-8") if isinstance(file, bytes) else str(file)
    return prompt_text(json.loads(lines(file)[int(example["line"]) - 1]))

  return prompt_of


def verifier_judge(fn: Callable[[str, str], Any], tokenizer, prompt_of: Callable[[int], str],
                   seat: str = "agent", name: str = "verifier"):
  """The responder: ``seat``'s rewards ``fn(prompt, completion)``, NaN where ``fn`` fails."""
  rewards_key = records.seat_key(seat, "rewards")
  warned = []

  def score(example_B, completion_BN, mask_BN):
    out = np.zeros((len(example_B),), np.float32)
    errors = 0
    for b in range(len(example_B)):
      completion = tokenizer.decode_until_eos(completion_BN[b][mask_BN[b] > 0])
      try:
        value = float(fn(prompt_of(int(example_B[b])), completion))
        if not math.isfinite(value):
          raise ValueError(f"returned {value}")
      except Exception as e:               # the user's code: any failure is a skipped reward
        value, errors = math.nan, errors + 1
        if not warned:
          warned.append(True)
          _LOG.warning("%s raised or returned a non-finite reward (%s: %s); such completions "
                       "are counted and skipped", name, type(e).__name__, e)
      out[b] = value
    return out, np.float32(errors)

  def respond(state, moves, facts, rng):
    del state, rng
    if EXAMPLE not in facts:
      raise KeyError(f"verifier_judge needs each prompt's example index ({EXAMPLE!r}) in the "
                     f"batch (the prompt loader gives it); got keys {sorted(facts)}")
    b = moves.tokens.shape[0]
    shapes = (jax.ShapeDtypeStruct((b,), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32))
    rewards_B, errors = jax.pure_callback(
        lambda *a: score(*map(np.asarray, a)), shapes, facts[EXAMPLE], facts["completion"],
        facts["completion_mask"])
    finite_B = jnp.isfinite(rewards_B)
    mean = jnp.sum(jnp.where(finite_B, rewards_B, 0.0)) / jnp.maximum(finite_B.sum(), 1)
    return {rewards_key: rewards_B,
            "metrics": {"judge/reward": mean, "judge/verifier_errors": errors}}

  return respond
