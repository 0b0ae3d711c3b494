"""Faults: a run killed (kill -9) or preempted (SIGTERM) at a random step and resumed ends exactly
as a run never interrupted; an unreadable latest checkpoint falls back to the one before; a failed
checkpoint write (a full disk) keeps the earlier checkpoints; checkpoints are written while the
steps go on; a non-finite payoff can stop a run."""
import json
import os
import random
import resource
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from gamejax import cli, config, run, sharding
from gamejax.checkpoint import CheckpointWriteError, Checkpointer
from gamejax.models.llama import LlamaConfig
from gamejax.payoffs import imitation
from gamejax.run import faults

EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
# Pre-training then GRPO (sampling in the step, a judge, a frozen reference), a checkpoint every
# 2 steps, metrics every step: a kill can land anywhere between two checkpoints.
TINY_GRPO = [f"--gin_file={EXP}/arithmetic/grpo.gin", f"--gin_file={EXP}/models/tiny.gin",
             "--gin.Experiment.stages=[@pretrain/Stage(), @grpo/Stage()]",
             "--gin.pretrain/Stage.steps=6", "--gin.RL_STEPS=6", "--gin.Stage.steps_per_call=1",
             "--gin.Stage.checkpoint_every=2", "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=64",
             "--gin.grpo/Stage.batch_size=2", "--gin.GROUP_SIZE=2",
             "--gin.pretrain/arena.num_train=100", "--gin.grpo/arena.num_train=100",
             "--gin.pretrain/arena.num_test=10", "--gin.grpo/arena.num_test=10",
             "--gin.Experiment.evaluation=None", "--no_progress"]

# Runs `gamejax train` and sends the process a signal of its own when a given metrics row is
# written: SIGKILL (no cleanup at all, a checkpoint write may be in flight) or SIGTERM.
DRIVER = """
import os, signal, sys
from gamejax import cli
from gamejax.run import loop
stage, step, when, sig = sys.argv[1], int(sys.argv[2]), sys.argv[3], getattr(signal, sys.argv[4])
write = loop.MetricsWriter.write
def write_then_signal(self, row):
  hit = row.get("stage") == stage and row.get("step") == step and "loss" in row
  if hit and when == "before":
    os.kill(os.getpid(), sig)
  write(self, row)
  if hit and when == "after":
    os.kill(os.getpid(), sig)
loop.MetricsWriter.write = write_then_signal
sys.exit(cli.main(sys.argv[5:]))
"""


def _interrupted(workdir, stage, step, when, sig, data_dir):
  env = dict(os.environ, GAMEJAX_DATA_DIR=str(data_dir))
  return subprocess.run([sys.executable, "-c", DRIVER, stage, str(step), when, sig, "train",
                         *TINY_GRPO, f"--workdir={workdir}"], env=env, capture_output=True,
                        text=True, timeout=600)


def _rows(workdir):
  """(stage, step, kind) of each metrics row in order, and the rows without their timings."""
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  keys = [(r["stage"], r["step"], "eval" if "eval/accuracy" in r else "train") for r in rows]
  return keys, [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]


def _final_params(workdir):
  exp, names = cli._load_run(str(workdir))
  return {name: run.restore_players(exp, i, str(workdir)) for i, name in enumerate(names)}


def _assert_bitwise(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def _summary(workdir):
  out = json.load(open(os.path.join(workdir, "summary.json")))
  for figures in out.values():
    figures.pop("tokens_per_s", None)
  return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, worker_id):
  """The run never interrupted, trained once per test session (pytest-xdist's workers share it:
  the first to get here trains it, the others wait and read it)."""
  import filelock
  if worker_id == "master":
    base = tmp_path_factory.mktemp("faults")
  else:
    base = tmp_path_factory.getbasetemp().parent / "faults-uninterrupted"
  with filelock.FileLock(str(base) + ".lock"):
    if not (base / "straight" / "summary.json").exists():
      os.environ["GAMEJAX_DATA_DIR"] = str(base / "data")
      try:
        assert cli.main(["train", *TINY_GRPO, f"--workdir={base / 'straight'}"]) == 0
      finally:
        del os.environ["GAMEJAX_DATA_DIR"]
  return base


# A random row of each stage (the seed is in the test id), the signal sent before or after it
# is written; SIGTERM must save and exit 0.
@pytest.mark.parametrize("seed,stage,sig", [(11, "pretrain", "SIGKILL"), (12, "grpo", "SIGKILL"),
                                            (13, "grpo", "SIGTERM")])
def test_interrupted_at_a_random_step_then_resumed_equals_uninterrupted(uninterrupted, tmp_path,
                                                                        monkeypatch, seed, stage,
                                                                        sig):
  rng = random.Random(seed)
  step, when = rng.randint(1, 5), rng.choice(["before", "after"])
  work = tmp_path / "run"
  proc = _interrupted(work, stage, step, when, sig, uninterrupted / "data")
  if sig == "SIGKILL":
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
  else:
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preempted: stage" in proc.stderr and "--resume" in proc.stderr
    saved = Checkpointer(str(work / "checkpoints" / stage)).latest_step()
    assert saved is not None and saved >= step     # the call in flight finished, then saved
  monkeypatch.setenv("GAMEJAX_DATA_DIR", str(uninterrupted / "data"))
  assert cli.main(["train", *TINY_GRPO, f"--workdir={work}", "--resume"]) == 0
  straight = uninterrupted / "straight"
  keys, rows = _rows(work)
  want_keys, want_rows = _rows(straight)
  assert keys == want_keys, f"step {step} {when}: rows {keys}"       # every step exactly once
  assert rows == want_rows
  assert _summary(work) == _summary(straight)                        # counted events included
  _assert_bitwise(_final_params(work), _final_params(straight))


def _tiny(data_dir, steps=8, **stage):
  s = run.Stage(name="sft", data=config.arena(players=[("perfect", 1.0)], num_train=100,
                                               num_test=10),
                payoff=imitation(["agent"]), steps=steps, batch_size=4, seq_len=64,
                steps_per_call=2, checkpoint_every=2, **stage)
  return run.Experiment(stages=[s], data_dir=str(data_dir),
                        model=LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64))


QUIET = dict(progress=False, log=lambda _: None)


def _mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(tmp_path):
  exp = _tiny(tmp_path / "data")
  straight = run.run_stage(exp, 0, None, str(tmp_path / "a"), _mesh(), **QUIET)
  run.run_stage(exp, 0, None, str(tmp_path / "b"), _mesh(), stop_after_steps=6, **QUIET)
  ckpts = tmp_path / "b" / "checkpoints" / "sft"
  assert sorted(os.listdir(ckpts)) == ["4", "6"]
  data = [os.path.join(d, f) for d, _, fs in os.walk(ckpts / "6" / "state") for f in fs
          if os.sep + "d" + os.sep in os.path.join(d, f)]
  largest = max(data, key=os.path.getsize)
  with open(largest, "r+b") as f:                  # a write cut short
    f.truncate(os.path.getsize(largest) // 2)
  lines = []
  resumed = run.run_stage(exp, 0, None, str(tmp_path / "b"), _mesh(), progress=False,
                          log=lines.append)
  assert any("checkpoint step 6" in l and "cannot be read" in l and "from step 4" in l
             for l in lines), lines
  assert any("resumed from step 4" in l for l in lines), lines
  assert os.listdir(str(ckpts) + ".corrupt")[0].startswith("6-")     # kept, out of the way
  _assert_bitwise(straight.params, resumed.params)
  keys, _ = _rows(tmp_path / "b")
  assert keys == [("sft", s, "train") for s in (2, 4, 6, 8)]


def test_a_failed_checkpoint_write_keeps_the_earlier_ones(tmp_path, monkeypatch):
  """A full disk during the step-6 save (file writes fail past 20 kB): the run stops with an
  error naming the checkpoint, steps 2 and 4 stay readable, and a resume ends as a run never
  interrupted."""
  exp = _tiny(tmp_path / "data")
  straight = run.run_stage(exp, 0, None, str(tmp_path / "a"), _mesh(), **QUIET)
  save = Checkpointer.save
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # a write past the limit fails

  def save_on_a_full_disk(self, step, *args, **kwargs):
    if step == 6:
      self.wait()                                   # step 4's write is done, on a sound disk
      resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(Checkpointer, "save", save_on_a_full_disk)
  try:
    with pytest.raises(CheckpointWriteError, match=r"checkpoint step 6 .* earlier checkpoints "
                                                   r"\[2, 4\] are intact"):
      run.run_stage(exp, 0, None, str(tmp_path / "b"), _mesh(), **QUIET)
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  monkeypatch.setattr(Checkpointer, "save", save)
  ckpts = tmp_path / "b" / "checkpoints" / "sft"
  assert Checkpointer(str(ckpts)).latest_step() == 4
  lines = []
  resumed = run.run_stage(exp, 0, None, str(tmp_path / "b"), _mesh(), progress=False,
                          log=lines.append)
  assert any("resumed from step 4" in l for l in lines), lines
  _assert_bitwise(straight.params, resumed.params)
  keys, _ = _rows(tmp_path / "b")
  assert keys == [("sft", s, "train") for s in (2, 4, 6, 8)]


def test_a_save_returns_before_its_write_is_done(tmp_path, monkeypatch):
  """The step does not wait for the disk: ``save`` returns while orbax still writes (here held
  back until released); ``wait`` then finishes the checkpoint."""
  import orbax.checkpoint as ocp
  release = threading.Event()
  write = ocp.JsonCheckpointHandler._save_fn

  async def held_back(self, *args, **kwargs):
    import asyncio
    await asyncio.to_thread(release.wait, 60)
    return await write(self, *args, **kwargs)

  monkeypatch.setattr(ocp.JsonCheckpointHandler, "_save_fn", held_back)
  ckpt = Checkpointer(str(tmp_path / "stage"))
  state = {"w": jax.numpy.ones((4, 4))}
  ckpt.save(1, state, {"data": {}})
  assert not (tmp_path / "stage" / "1").exists()              # still being written
  # orbax makes the temporary directory from its own thread too: on a busy host, a moment later
  writing = lambda: (tmp_path / "stage").is_dir() and any(
      name.startswith("1.") for name in os.listdir(tmp_path / "stage"))
  deadline = time.monotonic() + 30
  while not writing() and time.monotonic() < deadline:
    time.sleep(0.05)
  assert writing() and not (tmp_path / "stage" / "1").exists()
  release.set()
  ckpt.wait()
  assert os.listdir(tmp_path / "stage") == ["1"]
  ckpt.close()


def test_on_nonfinite_stop_ends_the_run_at_its_last_good_checkpoint(tmp_path):
  from gamejax.players import judges
  from gamejax.payoffs import rloo
  import jax.numpy as jnp
  def reward(moves, facts):
    del facts
    return jnp.where(moves.tokens[:, 0] >= 0, jnp.nan, 1.0)          # every reward NaN

  stage = run.Stage(name="rl", data=config.arena(players=[("perfect", 1.0)], num_train=50,
                                                 num_test=10, max_digits=2),
                    payoff=rloo(2), steps=6, batch_size=2, steps_per_call=2, checkpoint_every=2,
                    rollout=run.Rollout(group_size=2, max_new_tokens=2, prompt_len=12,
                                        judge=judges.function_judge(reward)),
                    on_nonfinite="stop")
  exp = run.Experiment(stages=[stage], data_dir=str(tmp_path / "data"),
                       model=LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64))
  with pytest.raises(faults.NonFiniteStop, match="stage 'rl': a non-finite .* up to step 2"):
    run.run_stage(exp, 0, None, str(tmp_path / "run"), _mesh(), **QUIET)
  assert Checkpointer(str(tmp_path / "run" / "checkpoints" / "rl")).latest_step() is None


def test_keep_metrics_until_drops_rows_after_the_checkpoint_and_a_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"stage": "a", "step": 2}, {"stage": "b", "step": 0, "eval/accuracy": 0.5},
          {"stage": "b", "step": 2}, {"stage": "b", "step": 4}, {"stage": "c", "step": 2}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "b", "st')
  assert faults.keep_metrics_until(str(path), "b", 2, later=["c"]) == 3
  assert [json.loads(l) for l in open(path)] == rows[:3]
  assert faults.keep_metrics_until(str(path), "b", -1) == 2           # no checkpoint: none
  assert [json.loads(l) for l in open(path)] == rows[:1]


def test_reproduce_reruns_a_finished_run_and_compares_it_bitwise(uninterrupted, tmp_path,
                                                                 monkeypatch, capsys):
  """`gamejax reproduce` re-runs the run from its config.gin into a new directory: on the same
  platform metrics and final params are bitwise equal. A run whose recorded figures were altered
  does not reproduce, and the report names what differs."""
  import shutil
  from gamejax.run import reproduce
  monkeypatch.setenv("GAMEJAX_DATA_DIR", str(uninterrupted / "data"))
  straight = uninterrupted / "straight"
  recorded = json.load(open(straight / "environment.json"))["started"]
  assert recorded["packages"]["jax"] == jax.__version__ and recorded["device_count"] >= 1
  assert set(recorded) >= {"gamejax_git", "python", "backend", "device_kind", "command"}
  capsys.readouterr()
  assert cli.main(["reproduce", f"--workdir={straight}", f"--new_workdir={tmp_path / 'again'}",
                   "--no_progress"]) == 0
  out = capsys.readouterr().out
  report = json.loads(out[out.index("{"):])
  assert report["match"] and report["same_platform"] and report["mode"] == "bitwise"
  assert report["metrics"]["rows"] == 12 and set(report["params"]) == {"pretrain", "grpo"}
  # On the CPU backend, a run recorded on another kind of host CPU is compared within
  # tolerance, and told so.
  if jax.default_backend() == "cpu":
    moved = tmp_path / "moved"
    shutil.copytree(straight, moved)
    env = json.load(open(moved / "environment.json"))
    env["started"]["host_cpu"] = {"model": "another CPU", "features": ["avx2"]}
    (moved / "environment.json").write_text(json.dumps(env))
    assert cli.main(["reproduce", f"--workdir={moved}",
                     f"--new_workdir={tmp_path / 'again_moved'}", "--no_progress"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out[captured.out.index("{"):])
    assert report["match"] and not report["same_platform"] and report["mode"].startswith("within")
    assert "the run's host CPU was" in captured.err and "another CPU" in captured.err
  # A run that was not what it claims: one loss and one weight changed.
  altered = tmp_path / "altered"
  shutil.copytree(straight, altered)
  rows = [json.loads(line) for line in open(altered / "metrics.jsonl")]
  rows[3]["loss"] += 1e-7
  (altered / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  exp, _ = cli._load_run(str(altered))
  report = reproduce.compare_runs(exp, str(altered), str(tmp_path / "again"), bitwise=True)
  assert not report["match"] and report["metrics"]["differing_count"] == 1
  assert "('pretrain', 4, 'train') loss" in report["metrics"]["differing"][0]
  assert all(p["match"] for p in report["params"].values())
  # Within tolerance (another platform), that loss is equal.
  report = reproduce.compare_runs(exp, str(altered), str(tmp_path / "again"), bitwise=False)
  assert report["match"]
  # A re-run directory that holds a run is refused.
  assert cli.main(["reproduce", f"--workdir={straight}",
                   f"--new_workdir={tmp_path / 'again'}"]) == 2


def test_a_run_from_another_kind_of_host_cpu_is_not_held_to_bitwise(tmp_path):
  """XLA:CPU picks kernels by the host's instruction sets, and they round differently: the
  environment names the host CPU (``reproduce.host_cpu``, from Linux's cpuinfo), and runs on the
  CPU backend are held to bitwise equality only on the same kind of CPU (records without it, as
  written before, are taken as the same)."""
  from gamejax.run import reproduce
  cpuinfo = tmp_path / "cpuinfo"
  cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n"
                     "model\t\t: 17\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2 fma "
                     "avx512f avx512_bf16 rdrand\n\nprocessor\t: 1\nflags\t\t: fpu\n")
  cpu = reproduce.host_cpu(str(cpuinfo))
  assert cpu == {"model": "vendor_id AuthenticAMD / cpu family 25 / model 17 / model name AMD EPYC",
                 "features": ["avx", "avx2", "avx512_bf16", "avx512f", "fma", "sse4_2"]}
  assert reproduce.host_cpu(str(tmp_path / "none"))["features"] == []
  here = reproduce.environment()
  assert here["host_cpu"] == reproduce.host_cpu()
  other = {**here, "host_cpu": cpu if here["host_cpu"] != cpu else {**cpu, "features": []}}
  assert reproduce.same_platform(here, here)
  assert reproduce.same_platform(here, other) == (here["backend"] != "cpu")
  older = {k: v for k, v in here.items() if k != "host_cpu"}
  assert reproduce.same_platform(older, here) and reproduce.same_platform(here, older)


def test_resume_on_another_mesh_is_allowed_any_other_change_refused(tmp_path, capsys):
  """Only the mesh may change across a resume (orbax reshards the checkpoint onto it; restoring
  a run written on 8 devices, by 2 processes, onto one device is what tests/test_multiprocess.py
  does); another binding that changed is refused."""
  old = tmp_path / "config.gin"
  old.write_text("Experiment.mesh_fsdp = 4\nExperiment.seed = 0\n")
  cli._check_resumable(str(old), "Experiment.mesh_fsdp = 2\nExperiment.mesh_tensor = 2\n"
                                 "Experiment.seed = 0\n")
  assert "resharded" in capsys.readouterr().err
  with pytest.raises(cli.UsageError, match="differs from the config given now"):
    cli._check_resumable(str(old), "Experiment.mesh_fsdp = 4\nExperiment.seed = 1\n")
