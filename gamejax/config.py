"""gin wiring at the edge: the configurables an experiment file may name, and parsing with errors
that name the file, the line and the unknown name (with close matches).

Configurables (use these names in ``.gin`` files):
  run structure: ``Experiment``, ``Stage``, ``Player``, ``Optimizer``, ``Evaluation``,
    ``Rollout``, ``Spin``;
  models: each family's config (``LlamaConfig``, ``Qwen2Config``, ``Qwen3Config``, ``GPT2Config``),
    ``pretrained_model``, ``LoraConfig``;
  games and their players: ``matrix_game``, ``kuhn_poker``; followers ``snapshot``, ``lagged``, ``ema``,
    ``league``; seat ``mixture``, ``scripted``; ``role_baselines``;
  payoffs: ``imitation``, ``weighted``, ``grpo``, ``rloo``, ``reinforce``, ``kl_to_reference``,
    ``dpo``, ``ipo``, ``bradley_terry``, ``ppo``, ``ppo_prepare``, ``mmd``, ``sppo``,
    ``first_move_probe`` (a probe: weight it 0);
  judges and opponents: ``arena_judge``, ``pairwise_judge``, ``arena_preference``,
    ``cyclic_preference``, ``cyclic_equilibrium``,
    ``arena_feedback``, ``fixed_reply``, ``verifier`` (a Python function by import path);
  data sources: ``arena``, ``arena_preferences``, ``local_text``.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import logging
import os
import re
import tokenize
from typing import Sequence

import gin

from gamejax import run
from gamejax.data import arena as arena_data
from gamejax.models import families, lora
from gamejax import payoffs
from gamejax.data import preferences as preference_data
from gamejax.games import base as games_base, kuhn, matrix, redteam
from gamejax.players import judges, opponents, selfplay, verifiers, versus


class ConfigError(ValueError):
  """A gin file or binding that cannot be parsed or does not build an experiment."""


_REGISTERED = False


def register() -> None:
  """Registers gamejax's configurables with gin (idempotent)."""
  global _REGISTERED
  if _REGISTERED:
    return
  for obj in (run.Experiment, run.Stage, run.Player, run.Optimizer, run.Evaluation, run.DataSpec,
              run.Rollout, run.Spin, lora.LoraConfig, *families.configs()):
    gin.external_configurable(obj, name=obj.__name__, module="gamejax")
  for fn in (payoffs.imitation, payoffs.weighted, payoffs.grpo, payoffs.rloo, payoffs.reinforce,
             payoffs.kl_to_reference, payoffs.dpo, payoffs.ipo, payoffs.bradley_terry,
             payoffs.ppo, payoffs.ppo_prepare, payoffs.mmd, payoffs.sppo,
             payoffs.first_move_probe):
    gin.external_configurable(fn, name=fn.__name__, module="gamejax")
  for fn in (judges.arena_judge, judges.pairwise_judge, judges.arena_preference,
             judges.cyclic_preference, judges.cyclic_equilibrium, versus.versus_judge,
             opponents.arena_feedback, opponents.fixed_reply,
             selfplay.snapshot, selfplay.lagged, selfplay.ema, selfplay.league, selfplay.mixture,
             selfplay.role_baselines, games_base.scripted,
             matrix.matrix_game, kuhn.kuhn_poker, redteam.redteam_game):
    gin.external_configurable(fn, name=fn.__name__, module="gamejax")
  gin.external_configurable(arena, name="arena", module="gamejax")
  gin.external_configurable(local_text, name="local_text", module="gamejax")
  gin.external_configurable(arena_preferences, name="arena_preferences", module="gamejax")
  gin.external_configurable(pretrained_model, name="pretrained_model", module="gamejax")
  gin.external_configurable(verifiers.verifier, name="verifier", module="gamejax")
  _REGISTERED = True


def pretrained_model(checkpoint: str = gin.REQUIRED, dtype: str = "float32",
                     param_dtype: str = "float32", remat: str = "none"):
  """The model config of a checkpoint, ``"hf:DIR"`` or ``"gguf:FILE"`` (its config.json or GGUF
  metadata): ``Experiment.model = @pretrained_model()`` with ``pretrained_model.checkpoint``, then
  a learner's ``init_from`` names the same checkpoint for its params. ``dtype``, ``param_dtype``
  and ``remat`` (``gamejax.models.remat``) are the run's, not the checkpoint's."""
  from gamejax import interop
  if not interop.is_checkpoint(checkpoint):
    raise ValueError(f"pretrained_model.checkpoint={checkpoint!r}: expected 'hf:DIR' or "
                     "'gguf:FILE'")
  return interop.checkpoint_config(checkpoint, dtype=dtype, param_dtype=param_dtype, remat=remat)


def arena(min_digits: int = 1, max_digits: int = 3, ops: Sequence[str] = ("+", "-"),
          players: Sequence = (("perfect", 1.0),), worked: bool = True, outcome_tag=False,
          num_train: int = 20000, num_test: int = 1000, seed: int = 0,
          test_fraction: float = 0.1, pad: bool = True, too_long: str = "truncate") -> run.DataSpec:
  """Records of the arithmetic arena: problems posed by the opponent, answered by ``players``
  (scripted player specs with weights: ``[("perfect", 0.5), ("drop_carry:0", 0.5)]``).
  ``outcome_tag``: True (the opponent's move opens with "W " or "L ": whether the answer that
  follows is right) or a pair of tags ``("right: ", "wrong: ")``."""
  params = dict(min_digits=min_digits, max_digits=max_digits, ops=tuple(ops),
                players=arena_data.normalize_players(players), worked=bool(worked),
                outcome_tag=arena_data.canonical_outcome_tag(outcome_tag), num_train=num_train,
                num_test=num_test, seed=seed,
                test_fraction=test_fraction, pad=bool(pad))
  return run.DataSpec("arithmetic_arena", params, too_long)


def arena_preferences(min_digits: int = 1, max_digits: int = 3, ops: Sequence[str] = ("+", "-"),
                      players: Sequence = preference_data.DEFAULT_PLAYERS, worked: bool = True,
                      num_train: int = 20000, num_test: int = 500, seed: int = 0,
                      test_fraction: float = 0.1, pad: bool = True) -> run.DataSpec:
  """Preference pairs of the arithmetic arena: per problem a better-graded (chosen) and a
  worse-graded (rejected) answer by two of ``players``."""
  params = dict(min_digits=min_digits, max_digits=max_digits, ops=tuple(ops),
                players=arena_data.normalize_players(players), worked=bool(worked),
                num_train=num_train, num_test=num_test, seed=seed, test_fraction=test_fraction,
                pad=bool(pad))
  return run.DataSpec("arena_preferences", params, "error")


def local_text(path: str = gin.REQUIRED, split_paragraphs: bool = False,
               test_fraction: float = 0.05, test_count: int | None = None,
               too_long: str = "truncate", tokenizer: str = "byte") -> run.DataSpec:
  """A user's own folder of ``.txt`` / ``.jsonl`` files; ``test_count`` records (None:
  ``test_fraction`` of them) are held out for the held-out loss and perplexity. ``tokenizer``:
  ``"byte"`` or ``"hf:DIR"`` (whose chat template renders ``{"messages": ...}`` lines)."""
  params = dict(path=os.path.abspath(os.path.expanduser(path)), split_paragraphs=split_paragraphs,
                test_fraction=test_fraction, test_count=test_count, tokenizer=tokenizer)
  return run.DataSpec("local_text", params, too_long)


# ----------------------------------------------------------------------------------------------
# Parsing with good errors.

def _configurable_names() -> list[str]:
  return sorted({sel.split(".")[-1] for sel, _ in gin.config._REGISTRY.items()})  # pylint: disable=protected-access


def _parameter_names(configurable: str) -> list[str]:
  try:
    fn = gin.config._REGISTRY.get_match(configurable).wrapped  # pylint: disable=protected-access
  except Exception:  # unknown configurable: nothing to suggest
    return []
  target = fn.__init__ if inspect.isclass(fn) else fn
  return [p for p in inspect.signature(target).parameters if p not in ("self", "args", "kwargs")]


def _suggest(name: str, candidates: Sequence[str]) -> str:
  close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
  return f" Did you mean: {', '.join(close)}?" if close else ""


def explain(err: BaseException, where: str) -> ConfigError:
  """A ConfigError naming ``where`` (a file or a flag), the line, and close matches."""
  msg = str(err)
  loc = re.search(r'In file "([^"]+)", line (\d+)', msg)
  place = f"{loc.group(1)}:{loc.group(2)}" if loc else where
  first = msg.strip().splitlines()[0] if msg.strip() else type(err).__name__
  m = re.match(r"No configurable matching '([^']+)'", first)
  if m:
    name = m.group(1).split("/")[-1]
    return ConfigError(f"{place}: unknown configurable '{name}'.{_suggest(name, _configurable_names())}")
  m = re.match(r"Configurable '([^']+)' doesn't have a parameter named '([^']+)'", first)
  if m:
    conf, param = m.groups()
    return ConfigError(f"{place}: configurable '{conf}' has no parameter '{param}'."
                       f"{_suggest(param, _parameter_names(conf))}")
  if isinstance(err, SyntaxError) and err.lineno:
    return ConfigError(f"{err.filename or where}:{err.lineno}: syntax error: {err.msg}"
                       f"{' -> ' + err.text.strip() if err.text else ''}")
  if isinstance(err, tokenize.TokenError):
    line = err.args[1][0] if len(err.args) > 1 else "?"
    return ConfigError(f"{where}:{line}: syntax error: {err.args[0]}")
  m = re.search(r"in scope '([^']+)'", msg)
  if "macro()" in msg and m:
    return ConfigError(f"{where}: macro %{m.group(1)} is used but never defined")
  m = re.match(r"(\S+) set to `%gin.REQUIRED` but not subsequently overridden", first)
  if m:
    return ConfigError(f"{where}: {m.group(1)} is %gin.REQUIRED and was never set")
  m = re.search(r"Required bindings for `([^`]+)` not provided in config: \[([^\]]*)\]", msg)
  if m:
    return ConfigError(f"{where}: {m.group(1)} needs {m.group(2)} to be set (%gin.REQUIRED)")
  return ConfigError(f"{place}: {type(err).__name__}: {first}")


@contextlib.contextmanager
def _quiet_gin():
  """gin logs every search-path miss of an include at ERROR level; the include still resolves."""
  logging.disable(logging.ERROR)
  try:
    yield
  finally:
    logging.disable(logging.NOTSET)


def parse(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses ``gin_files`` then ``bindings`` (``KEY=VALUE``), raising ConfigError on any problem."""
  register()
  gin.clear_config()
  if not gin_files:
    raise ConfigError("no --gin_file given")
  for path in gin_files:
    if not os.path.isfile(path):
      raise ConfigError(f"{path}: no such gin file")
    here = os.path.dirname(os.path.abspath(path))
    for d in (here, os.path.dirname(here), repo_experiments_dir()):   # includes resolve from these
      gin.add_config_file_search_path(d)
    try:
      with _quiet_gin():
        gin.parse_config_file(path)
    except (Exception, SyntaxError) as e:  # gin raises ValueError, SyntaxError, TokenError, OSError
      raise explain(e, path) from None
  for binding in bindings:
    try:
      gin.parse_config(binding)
    except (Exception, SyntaxError) as e:
      err = explain(e, f"--gin.{binding}")
      raise ConfigError(f"{err}{quoting_hint(binding, e)}") from None
  try:
    gin.finalize()                      # runs gin's check that no %gin.REQUIRED is left unset
  except (Exception, SyntaxError) as e:
    raise explain(e, ", ".join(gin_files)) from None


def quoting_hint(binding: str, err: BaseException) -> str:
  """For a ``--gin.KEY=VALUE`` whose value does not parse: the quoting that works.

  gin reads a value as a Python literal, so a string needs quotes of its own, inside the shell's:
  ``--gin.local_text.path="'/path/to/folder'"``.
  """
  key, sep, value = binding.partition("=")
  value = value.strip()
  if not sep or not value or not isinstance(err, (SyntaxError, ValueError)):
    return ""
  if value[0] not in "'\"[({@%" and "'" not in value:
    return (f"\n  gin reads --gin. values as Python literals: a string needs its own quotes, "
            f"inside the shell's: --gin.{key.strip()}=\"'{value}'\"")
  token = re.search(r"Failed to parse token '([^']+)'", str(err))
  if token:
    return (f"\n  gin reads --gin. values as Python literals: quote the string '{token.group(1)}' "
            f"inside the value, and the whole flag for the shell, e.g. "
            f"--gin.{key.strip()}=\"{value.replace(token.group(1), repr(token.group(1)), 1)}\"")
  return ""


def build_experiment(where: str = "the gin config") -> run.Experiment:
  """Calls the configured ``Experiment`` (so every missing or unknown value surfaces now)."""
  try:
    exp = gin.get_configurable("gamejax.Experiment")()
    exp.validate()
  except ConfigError:
    raise
  except (Exception, SyntaxError) as e:
    raise explain(e, where) from None
  return exp


def operative_config() -> str:
  return gin.operative_config_str()


def repo_experiments_dir() -> str:
  """The ``experiments/`` folder shipped beside the package (for includes by relative path)."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
