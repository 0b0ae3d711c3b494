"""``gamejax`` command line.

  gamejax train --gin_file=FILE [--gin_file=...] [--gin.KEY=VALUE ...] --workdir=DIR
                [--resume | --overwrite] [--no_progress] [--dry_run]
                [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]
  gamejax reproduce --workdir=DIR [--new_workdir=DIR] [--no_progress]
  gamejax eval --workdir=DIR [--stage=NAME] [--player=NAME] [--export_policy=FILE.json]
  gamejax plot --workdir=DIR [--workdir=DIR ...] [--output=FOLDER]
  gamejax league --workdir=DIR [--stage=NAME]
  gamejax generate --workdir=DIR [--stage=NAME] (--prompt=TEXT ... | --prompts=FILE.jsonl)
                   [--num_samples=N] [--temperature=T] [--top_k=K] [--top_p=P]
                   [--max_new_tokens=N] [--seed=S] [--cache_block=N] [--output=FILE.jsonl]
  gamejax export --workdir=DIR [--stage=NAME] --format=hf OUT_DIR

Exit codes: 0 success (and a run stopped by SIGTERM after saving its checkpoint); 2 bad input
(config, workdir, data, checkpoint); 1 anything else (a failed checkpoint write, a non-finite
payoff with ``Stage.on_nonfinite='stop'``, a re-run that does not reproduce).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Sequence

RUN_FILES = ("config.gin", "metrics.jsonl", "summary.json", "checkpoints", "environment.json")
MESH_BINDING = re.compile(r"^Experiment\.mesh_\w+ = .*(?:\n|$)", re.MULTILINE)


class UsageError(ValueError):
  """Bad command-line input: a workdir in the way, a missing checkpoint, ..."""


def _split_gin_flags(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pulls ``--gin.KEY=VALUE`` (and ``--gin.KEY VALUE``) out of argv as gin bindings."""
  rest, bindings, i = [], [], 0
  argv = list(argv)
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--gin.") and arg != "--gin.":
      body = arg[len("--gin."):]
      if "=" not in body:
        if i + 1 >= len(argv):
          raise UsageError(f"{arg}: expected --gin.KEY=VALUE")
        body, i = f"{body}={argv[i + 1]}", i + 1
      bindings.append(body)
    else:
      rest.append(arg)
    i += 1
  return rest, bindings


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="gamejax", description="Train language models by playing games.")
  sub = p.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="run an experiment from gin files")
  t.add_argument("--gin_file", action="append", default=[], required=True,
                 help="a gin experiment file (repeatable; later files override earlier ones)")
  t.add_argument("--workdir", required=True, help="run directory (config, metrics, checkpoints)")
  g = t.add_mutually_exclusive_group()
  g.add_argument("--resume", action="store_true", help="continue the run in --workdir")
  g.add_argument("--overwrite", action="store_true", help="delete the run in --workdir first")
  t.add_argument("--no_progress", action="store_true", help="no progress bar")
  t.add_argument("--dry_run", action="store_true",
                 help="parse and validate the config, print it and the stages; create nothing")
  _add_distributed_flags(t)
  r = sub.add_parser("reproduce", help="re-run a finished run from its config.gin into a new "
                     "directory and compare metrics and final params")
  r.add_argument("--workdir", required=True, help="the finished run")
  r.add_argument("--new_workdir", default=None,
                 help="where the re-run goes (must hold no run; default: WORKDIR-reproduce)")
  r.add_argument("--no_progress", action="store_true", help="no progress bar")
  _add_distributed_flags(r)
  e = sub.add_parser("eval", help="evaluate a run's latest checkpoint on the held-out split")
  e.add_argument("--workdir", required=True)
  e.add_argument("--stage", default=None, help="stage to evaluate (default: the last one trained)")
  e.add_argument("--player", default=None,
                 help="a learner of the stage: its own figures (default: every player's)")
  e.add_argument("--export_policy", default=None, metavar="FILE.json",
                 help="a game stage: write the seated players' policy (Kuhn poker: "
                 "{OpenSpiel information state: [p(pass), p(bet)]})")
  lg = sub.add_parser("league", help="win rates and Elo of a stage's league of past selves")
  lg.add_argument("--workdir", required=True)
  lg.add_argument("--stage", default=None, help="stage with a league (default: the last one)")
  pl = sub.add_parser("plot", help="PNG curves of a run's logged metrics (needs matplotlib)")
  pl.add_argument("--workdir", required=True, action="append",
                  help="a run directory (repeatable: curves of several runs overlaid)")
  pl.add_argument("--output", default=None, help="folder for the PNGs (default: the first "
                  "WORKDIR/plots)")
  g = sub.add_parser("generate", help="sample completions of prompts from a stage's checkpoint "
                     "or an imported one")
  model = g.add_mutually_exclusive_group(required=True)
  model.add_argument("--workdir", help="a run directory (its tokenizer and its stage's params)")
  model.add_argument("--checkpoint", help="an imported model: 'hf:DIR' or 'gguf:FILE'")
  g.add_argument("--tokenizer", default=None, help="with --checkpoint: 'byte' or 'hf:DIR' "
                 "(default: the checkpoint's folder when it holds tokenizer.json, else byte)")
  g.add_argument("--stage", default=None,
                 help="policy stage to sample (default: the last policy stage with a checkpoint)")
  src = g.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
  src.add_argument("--prompts", help='a JSONL file of {"prompt": TEXT} lines')
  g.add_argument("--num_samples", type=int, default=1, help="completions per prompt")
  g.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default)")
  g.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest (0: off)")
  g.add_argument("--top_p", type=float, default=1.0, help="nucleus mass (1: off)")
  g.add_argument("--max_new_tokens", type=int, default=None,
                 help="completion budget (default: the arena's answer length, else 128)")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--cache_block", type=int, default=None,
                 help="the decode loop's steps in runs of this many (default: the sampler's, 64), "
                      "each attending only the KV cache filled by its end (0: one loop over the "
                      "whole cache, no copy to grow it)")
  g.add_argument("--output", default=None, help="also write the completions as JSONL here")
  x = sub.add_parser("export", help="write a policy stage's checkpoint in another library's format")
  x.add_argument("--workdir", required=True)
  x.add_argument("--stage", default=None,
                 help="policy stage to export (default: the last policy stage with a checkpoint)")
  x.add_argument("--format", required=True, choices=["hf", "peft"],
                 help="hf: a Hugging Face directory (config.json + safetensors + tokenizer; a "
                 "LoRA stage's adapters merged); peft: a LoRA stage's adapters as a PEFT adapter")
  x.add_argument("--max_shard_bytes", type=int, default=5 * 2**30,
                 help="safetensors files are sharded above this size (with an index)")
  x.add_argument("out", help="the directory to create (must not exist)")
  c = sub.add_parser("convert", help="write an imported checkpoint (GGUF or HF) as a Hugging Face "
                     "directory with its tokenizer")
  c.add_argument("checkpoint", help="'gguf:FILE' or 'hf:DIR'")
  c.add_argument("out", help="the directory to create (must not exist)")
  return p


def _add_distributed_flags(p: argparse.ArgumentParser) -> None:
  d = p.add_argument_group("several processes (default: one, or the TPU VM slice or SLURM job "
                           "JAX detects)")
  d.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
  d.add_argument("--num_processes", type=int, default=None)
  d.add_argument("--process_id", type=int, default=None)


def _join_processes(args) -> None:
  from gamejax import distributed
  how = distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  if how != "one process":
    print(f"gamejax: {how}", file=sys.stderr)


def _holds_run(workdir: str) -> bool:
  return os.path.isdir(workdir) and any(os.path.exists(os.path.join(workdir, f)) for f in RUN_FILES)


def _remove_run(workdir: str) -> None:
  """Deletes a run's files (and only those) from ``workdir``."""
  for name in RUN_FILES:
    path = os.path.join(workdir, name)
    if os.path.isdir(path):
      shutil.rmtree(path)
    elif os.path.exists(path):
      os.remove(path)


def train(args, bindings) -> int:
  from gamejax import config, distributed, run
  import jax
  if not args.dry_run:
    _join_processes(args)
  config.parse(args.gin_file, bindings)
  exp = config.build_experiment(", ".join(args.gin_file))
  operative = config.operative_config()
  distributed.check_same_everywhere("operative config", operative)
  mesh_note = _check_mesh(exp, args)
  workdir = os.path.abspath(args.workdir)
  if _holds_run(workdir) and not (args.overwrite or args.resume):
    raise UsageError(f"{workdir} holds another run; pass --resume to continue it or "
                     "--overwrite to replace it")
  if args.dry_run:
    what = ("would resume the run there" if args.resume and _holds_run(workdir) else
            "would replace the run there" if args.overwrite and _holds_run(workdir) else
            "would start a run there")
    print(f"# gamejax train --dry_run: the operative config\n{operative}\n"
          f"# stages\n{run.describe_stages(exp)}\n# mesh: {mesh_note}\n"
          f"# workdir {workdir}: {what} (nothing created)")
    return 0
  first = jax.process_index() == 0
  if first:                             # bad data fails here, before the workdir is touched
    run.prepare_data(exp)
  distributed.barrier("gamejax: data prepared")        # (built once, by process 0)
  if not first:
    run.prepare_data(exp)
  if _holds_run(workdir):
    if args.overwrite:
      distributed.barrier("gamejax: before overwrite")
      if first:
        _remove_run(workdir)
    else:
      _check_resumable(os.path.join(workdir, "config.gin"), operative)
  elif args.resume:
    print(f"gamejax: {workdir} holds no run yet; starting one", file=sys.stderr)
  distributed.barrier("gamejax: workdir checked")
  _start_run_files(workdir, operative)
  distributed.barrier("gamejax: run files written")
  run.run_experiment(exp, workdir, progress=not args.no_progress)
  return 0


def _check_mesh(exp, args) -> str:
  """The mesh settings against the devices here (a UsageError if they do not fit), and every
  parameter against the mesh. A dry run prepares a launch elsewhere: it checks the parameters on
  the devices the mesh asks for and says so."""
  from gamejax import run
  where = ", ".join(args.gin_file)
  try:
    return str(exp.check_mesh())
  except run.ExperimentError as e:
    if not args.dry_run:
      raise UsageError(f"{where}: {e}") from None
    wanted = exp.mesh_fsdp * exp.mesh_tensor * max(exp.mesh_data, 1)
    try:
      shape = exp.check_mesh(n_devices=wanted)
    except run.ExperimentError as again:
      raise UsageError(f"{where}: {again}") from None
    return (f"{shape} on {wanted} devices; not on this machine's: {e} (checked again when the "
            "run starts)")


def _check_resumable(old_path: str, operative: str) -> None:
  """A run resumes with the config it started with. Only the mesh may change: orbax restores the
  checkpoint into the new mesh's shardings (resharding), which changes no number but the order
  of float sums, so the run goes on equivalent, not bitwise equal."""
  if not os.path.exists(old_path):
    return
  old = open(old_path).read()
  if old == operative:
    return
  if MESH_BINDING.sub("", old) != MESH_BINDING.sub("", operative):
    raise UsageError(f"--resume: {old_path} differs from the config given now; resume with the "
                     "same gin files and bindings, or use --overwrite")
  was = ", ".join(m.strip() for m in MESH_BINDING.findall(old)) or "the default mesh"
  now = ", ".join(m.strip() for m in MESH_BINDING.findall(operative)) or "the default mesh"
  print(f"gamejax: --resume on another mesh ({was} -> {now}): the checkpoints are resharded "
        "onto it", file=sys.stderr)


def _start_run_files(workdir: str, operative: str) -> None:
  """config.gin and environment.json of a run (process 0 writes them)."""
  import jax
  from gamejax.run import reproduce
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, "config.gin.tmp")
  with open(tmp, "w") as f:
    f.write(operative)
  os.replace(tmp, os.path.join(workdir, "config.gin"))
  reproduce.record_environment(workdir)


def reproduce_run(args) -> int:
  """Re-runs the finished run in --workdir from its config.gin into --new_workdir and reports
  whether the metrics and final params match (bitwise on the same platform). Exit 1 if not."""
  from gamejax import run
  from gamejax.run import reproduce
  _join_processes(args)
  workdir = os.path.abspath(args.workdir)
  exp, names = _load_run(workdir)
  summary_path = os.path.join(workdir, "summary.json")
  summary = json.load(open(summary_path)) if os.path.exists(summary_path) else {}
  unfinished = [s.name for s in exp.stages if summary.get(s.name, {}).get("steps") != s.steps]
  if unfinished:
    raise UsageError(f"{workdir}: stages {unfinished} have not finished; reproduce compares "
                     "finished runs (resume it first with gamejax train --resume)")
  new = os.path.abspath(args.new_workdir or workdir.rstrip("/") + "-reproduce")
  if _holds_run(new):
    raise UsageError(f"--new_workdir={new} holds a run; give an empty or new directory")
  env_path = os.path.join(workdir, reproduce.ENVIRONMENT_FILE)
  recorded = json.load(open(env_path))["started"] if os.path.exists(env_path) else {}
  now = reproduce.environment()
  bitwise = bool(recorded) and reproduce.same_platform(recorded, now)
  changes = reproduce.version_changes(recorded, now)
  if not recorded:
    print(f"gamejax: {env_path} is missing: the platform is unknown, so the comparison is within "
          "tolerance", file=sys.stderr)
  elif changes:
    print(f"gamejax: package versions differ from the run's: {json.dumps(changes)}",
          file=sys.stderr)
  if now["backend"] == "cpu" and recorded.get("host_cpu", now["host_cpu"]) != now["host_cpu"]:
    print(f"gamejax: the run's host CPU was {json.dumps(recorded['host_cpu'])}, this one is "
          f"{json.dumps(now['host_cpu'])}: XLA:CPU's kernels may round differently, so the "
          "comparison is within tolerance", file=sys.stderr)
  operative = open(os.path.join(workdir, "config.gin")).read()
  run.prepare_data(exp)
  _start_run_files(new, operative)
  run.run_experiment(exp, new, progress=not args.no_progress)
  report = reproduce.compare_runs(exp, workdir, new, bitwise)
  report.update({"workdir": workdir, "new_workdir": new, "same_platform": bitwise,
                 "version_changes": changes})
  print(json.dumps(report, indent=2, sort_keys=True))
  print(f"gamejax: the re-run {'reproduces' if report['match'] else 'does NOT reproduce'} "
        f"{workdir} ({report['mode']})", file=sys.stderr)
  return 0 if report["match"] else 1


def _load_run(workdir: str):
  """``(experiment, stage names)`` of the run in ``workdir`` (from its config.gin)."""
  from gamejax import config
  cfg_path = os.path.join(workdir, "config.gin")
  if not os.path.exists(cfg_path):
    raise UsageError(f"{workdir}: no config.gin here; is it a gamejax run directory?")
  config.parse([cfg_path], [])
  exp = config.build_experiment(cfg_path)
  return exp, [s.name for s in exp.stages]


def _checkpointed(workdir: str, name: str) -> bool:
  path = os.path.join(workdir, "checkpoints", name)
  return os.path.isdir(path) and bool(os.listdir(path))


def _pick_stage(workdir: str, names: list[str], wanted: str | None,
                allowed: list[str] | None = None, what: str = "stage") -> str:
  """The stage to read: ``wanted``, else the last of ``allowed`` (default: all) with a checkpoint.
  A UsageError names the stages, and those with checkpoints, when there is none to read."""
  allowed = names if allowed is None else allowed
  have = [n for n in names if _checkpointed(workdir, n)]
  where = (f"checkpoints exist for {have}" if have else
           f"{os.path.join(workdir, 'checkpoints')} holds no checkpoint")
  if wanted is not None:
    if wanted not in names:
      raise UsageError(f"--stage={wanted!r} is not a stage of this run; stages: {names}")
    if wanted not in allowed:
      raise UsageError(f"--stage={wanted!r} is not a {what}; {what} stages: {allowed}")
    if wanted not in have:
      raise UsageError(f"--stage={wanted!r} has no checkpoint in {workdir}; {where}")
    return wanted
  for name in reversed(allowed):
    if name in have:
      return name
  raise UsageError(f"{workdir}: no checkpoint of any {what} stage ({allowed}); {where}")


def evaluate(args) -> int:
  from gamejax import run
  workdir = os.path.abspath(args.workdir)
  exp, names = _load_run(workdir)
  name = _pick_stage(workdir, names, args.stage)
  index = names.index(name)
  stage = exp.stages[index]
  if args.player is not None and args.player not in stage.players:
    raise UsageError(f"--player={args.player!r} is not a learner of stage {name!r}; its learners: "
                     f"{sorted(stage.players)}")
  export = getattr(stage.game, "export_policy", None)
  if args.export_policy is not None:
    if export is None:
      raise UsageError(f"--export_policy: stage {name!r} plays no game with a policy to export "
                       "(Kuhn poker has one)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.export_policy))):
      raise UsageError(f"--export_policy={args.export_policy}: no such directory")
  players, frozen = run.restore_players(exp, index, workdir)
  if args.export_policy is not None:
    run.export_policy(exp, index, players, args.export_policy, frozen=frozen)
  examples = run.load_eval_examples(exp)
  figures = run.evaluate_stage(exp, index, players, examples, frozen=frozen)
  if args.player is not None and "seats" in figures:       # the seats this player sits in
    figures["seats"] = {seat: f for seat, f in figures["seats"].items()
                        if stage.seated[seat] == args.player}
    figures["player"] = args.player
  if not figures:
    raise UsageError(f"stage {name!r} has no held-out figure: the experiment has no Evaluation "
                     "and the stage's data holds no test split")
  out = {name: figures}
  if examples is not None:
    out.update(run.reference_accuracies(exp, examples))
  print(json.dumps(out, indent=2, sort_keys=True))
  return 0


def _read_prompts(path: str) -> list[str]:
  """The prompts of a JSONL file: ``{"prompt": TEXT}`` per non-blank line."""
  if not os.path.isfile(path):
    raise UsageError(f"--prompts={path}: no such file")
  prompts = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise UsageError(f"{path}:{number}: not JSON ({e.msg})") from None
      if not (isinstance(record, dict) and isinstance(record.get("prompt"), str)):
        raise UsageError(f'{path}:{number}: expected {{"prompt": TEXT}}; got {line.strip()[:80]}')
      prompts.append(record["prompt"])
  if not prompts:
    raise UsageError(f"{path}: no prompts in it")
  return prompts


def generate(args) -> int:
  from gamejax import generate as gen, run
  from gamejax.evaluation import arena as arena_eval
  for flag, ok in (("--num_samples", args.num_samples >= 1), ("--top_k", args.top_k >= 0),
                   ("--temperature", args.temperature >= 0), ("--top_p", 0 < args.top_p <= 1),
                   ("--max_new_tokens", args.max_new_tokens is None or args.max_new_tokens >= 1),
                   ("--cache_block", args.cache_block is None or args.cache_block >= 0)):
    if not ok:
      raise UsageError(f"{flag}={getattr(args, flag[2:])} is out of range")
  if args.cache_block is None:
    from gamejax import sampling
    args.cache_block = sampling.DECODE_CACHE_BLOCK
  prompts = args.prompt if args.prompt else _read_prompts(args.prompts)
  if args.checkpoint:
    return _generate_from_checkpoint(args, prompts)
  if args.tokenizer:
    raise UsageError("--tokenizer goes with --checkpoint (a run uses its own tokenizer)")
  workdir = os.path.abspath(args.workdir)
  exp, names = _load_run(workdir)
  policies = [s.name for s in exp.stages if s.player != "reward_model"]
  name = _pick_stage(workdir, names, args.stage, policies, what="policy")
  index = names.index(name)
  stage = exp.stages[index]
  budget = args.max_new_tokens or (arena_eval.answer_budget(dict(stage.data.params))
                                   if stage.data.name == "arithmetic_arena" else 128)
  params = run.policies_of(exp, index, run.restore_params(exp, index, workdir))["agent"]
  rows = gen.complete(exp.model, params, prompts, budget, args.num_samples, args.temperature,
                      args.top_k, args.top_p, args.seed, tokenizer=exp.text_tokenizer,
                      cache_block=args.cache_block)
  _show_completions(args, prompts, rows, name)
  return 0


def _generate_from_checkpoint(args, prompts) -> int:
  from gamejax import generate as gen, interop
  from gamejax.data import tokenizer as tokenizers
  kind, _, path = args.checkpoint.partition(":")
  if not interop.is_checkpoint(args.checkpoint):
    raise UsageError(f"--checkpoint={args.checkpoint!r}: expected 'hf:DIR' or 'gguf:FILE'")
  spec = args.tokenizer or ("hf:" + path if kind == "hf" and os.path.isfile(
      os.path.join(path, "tokenizer.json")) else "byte")
  try:
    tok = tokenizers.load_tokenizer(spec)
    cfg, params = interop.load_checkpoint(args.checkpoint)
  except (ValueError, OSError) as e:
    raise UsageError(f"{e}") from None
  if tok.vocab_size > cfg.vocab_size:
    raise UsageError(f"tokenizer {spec!r} has {tok.vocab_size} ids; the checkpoint's embedding "
                     f"has {cfg.vocab_size} rows")
  rows = gen.complete(cfg, params, prompts, args.max_new_tokens or 128, args.num_samples,
                      args.temperature, args.top_k, args.top_p, args.seed, tokenizer=tok,
                      cache_block=args.cache_block)
  _show_completions(args, prompts, rows, args.checkpoint)
  return 0


def _show_completions(args, prompts, rows, name) -> None:
  for i, prompt in enumerate(prompts):
    print(f">>> {prompt}")
    for r in rows[i * args.num_samples:(i + 1) * args.num_samples]:
      print(f"[{r['sample']}] {r['completion']}" + ("" if r["stopped"] else "  (no EOS)"))
  if args.output:
    tmp = f"{args.output}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      for r in rows:
        f.write(json.dumps({"stage": name, **r}) + "\n")
    os.replace(tmp, args.output)
    print(f"# {len(rows)} completions of {name!r} written to {args.output}", file=sys.stderr)


def convert(args) -> int:
  from gamejax import interop
  from gamejax.interop import hf
  out = os.path.abspath(args.out)
  if os.path.exists(out):
    raise UsageError(f"{args.out} exists; convert writes a new directory")
  if not interop.is_checkpoint(args.checkpoint):
    raise UsageError(f"{args.checkpoint!r}: expected 'hf:DIR' or 'gguf:FILE'")
  try:
    cfg, params = interop.load_checkpoint(args.checkpoint)
    hf.save(cfg, params, out, tokenizer_from=args.checkpoint)
  except (ValueError, OSError) as e:
    raise UsageError(f"{e}") from None
  print(f"# {args.checkpoint} written to {out} ({type(cfg).__name__}, with its tokenizer)",
        file=sys.stderr)
  return 0


def export(args) -> int:
  from gamejax import interop, run
  from gamejax.interop import hf
  out = os.path.abspath(args.out)
  if os.path.exists(out):
    raise UsageError(f"{args.out} exists; export writes a new directory")
  if not os.path.isdir(os.path.dirname(out)):
    raise UsageError(f"{args.out}: no such parent directory")
  workdir = os.path.abspath(args.workdir)
  exp, names = _load_run(workdir)
  policies = [s.name for s in exp.stages if s.player != "reward_model"]
  name = _pick_stage(workdir, names, args.stage, policies, what="policy")
  index = names.index(name)
  if args.format == "peft":
    from gamejax.models import lora
    lcfg = exp.stages[index].players["agent"].lora
    if lcfg is None:
      raise UsageError(f"stage {name!r} trains no LoRA adapters; export it with --format=hf")
    adapters = run.restore_players(exp, index, workdir)[0]["agent"]
    base = exp.stages[index].players["agent"].init_from
    lora.save_peft(exp.model, lcfg, adapters, out,
                   base_model=base.partition(":")[2] if interop.is_checkpoint(base) else "")
  else:
    params = run.policies_of(exp, index, run.restore_params(exp, index, workdir))["agent"]
    hf.save(exp.model, params, out, max_shard_bytes=args.max_shard_bytes,
            tokenizer_from=exp.tokenizer)
  print(f"# stage {name!r} written to {out} ({args.format})", file=sys.stderr)
  return 0


def league(args) -> int:
  from gamejax import league as leagues
  workdir = os.path.abspath(args.workdir)
  exp, names = _load_run(workdir)
  name = _pick_stage(workdir, names, args.stage)
  try:
    leagues.run_league(exp, names.index(name), workdir)
  except leagues.LeagueError as e:
    raise UsageError(str(e)) from None
  return 0


def plot(args) -> int:
  from gamejax import plot as plotting
  for path in plotting.plot_run([os.path.abspath(w) for w in args.workdir], args.output):
    print(path)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    rest, bindings = _split_gin_flags(argv)
  except UsageError as e:
    print(f"gamejax: error: {e}", file=sys.stderr)
    return 2
  args = _parser().parse_args(rest)   # argparse exits 2 on its own errors
  if bindings and args.command != "train":
    print(f"gamejax: error: --gin. bindings apply to `gamejax train` only (the run's config.gin "
          f"configures {args.command}); got --gin.{bindings[0]}", file=sys.stderr)
    return 2
  from gamejax.checkpoint import CheckpointError, CheckpointWriteError
  from gamejax.config import ConfigError
  from gamejax.distributed import DistributedError
  from gamejax.run.faults import NonFiniteStop, Preempted
  from gamejax.data.errors import DataError
  from gamejax.plot import PlotError
  try:
    return {"train": lambda: train(args, bindings), "eval": lambda: evaluate(args),
            "generate": lambda: generate(args), "plot": lambda: plot(args),
            "league": lambda: league(args), "export": lambda: export(args),
            "convert": lambda: convert(args),
            "reproduce": lambda: reproduce_run(args)}[args.command]()
  except (ConfigError, UsageError, CheckpointError, DataError, PlotError, DistributedError) as e:
    print(f"gamejax: error: {e}", file=sys.stderr)
    return 2
  except Preempted as e:
    print(f"gamejax: {e}", file=sys.stderr)
    return 0
  except (CheckpointWriteError, NonFiniteStop) as e:
    print(f"gamejax: error: {e}", file=sys.stderr)
    return 1


def entrypoint() -> None:
  """The ``gamejax`` console script: re-executes once with huge-page malloc (see hostenv)."""
  from gamejax import hostenv
  hostenv.reexec_with_malloc_hugepages()
  sys.exit(main())


if __name__ == "__main__":
  entrypoint()
