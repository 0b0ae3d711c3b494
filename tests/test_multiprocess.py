"""Two processes x 4 CPU devices (JAX's distributed runtime on localhost, gloo collectives) play
the same run as one process with 8 devices: the same losses and final params, metrics written
once (by process 0), one checkpoint written by both; SIGTERM to one process stops both at the
same step (JAX's preemption sync point), and the relaunched pair resumes."""
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np

from gamejax import cli, run

EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
# Pre-training then GRPO (sampling in the step) on a 2 x 4 mesh (data x fsdp).
ARGS = [f"--gin_file={EXP}/arithmetic/grpo.gin", f"--gin_file={EXP}/models/tiny.gin",
        "--gin.Experiment.stages=[@pretrain/Stage(), @grpo/Stage()]",
        "--gin.Experiment.mesh_data=2", "--gin.Experiment.mesh_fsdp=4",
        "--gin.pretrain/Stage.steps=4", "--gin.RL_STEPS=12", "--gin.Stage.steps_per_call=2",
        "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=64",
        "--gin.grpo/Stage.batch_size=8", "--gin.GROUP_SIZE=2",
        "--gin.pretrain/arena.num_train=100", "--gin.grpo/arena.num_train=100",
        "--gin.pretrain/arena.num_test=10", "--gin.grpo/arena.num_test=10",
        "--gin.Experiment.evaluation=None", "--no_progress"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices, data_dir):
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
  return dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu",
              GAMEJAX_DATA_DIR=str(data_dir), GAMEJAX_NO_HUGEPAGES="1")


# `gamejax train` that sends itself SIGTERM once it has logged the row of pretrain step 2.
TERM_AT_PRETRAIN_2 = """
import os, signal, sys
from gamejax import cli
from gamejax.run import loop
write = loop.MetricsWriter.write
def write_then_term(self, row):
  write(self, row)
  if row.get("stage") == "pretrain" and row.get("step") == 2:
    os.kill(os.getpid(), signal.SIGTERM)
loop.MetricsWriter.write = write_then_term
sys.exit(cli.main(sys.argv[1:]))
"""
PLAIN = "import sys; from gamejax import cli; sys.exit(cli.main(sys.argv[1:]))"


def _train(args, env, script=PLAIN):
  return subprocess.Popen([sys.executable, "-c", script, "train", *args], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _pair(args, data, script0=PLAIN, args1=()):
  """Two processes of one run (process 1 also given ``args1``); their (returncode, stderr)."""
  port = _free_port()
  flags = [f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  procs = [_train([*args, *flags, f"--process_id={i}", *(args1 if i else ())], _env(4, data),
                  script0 if i == 0 else PLAIN) for i in range(2)]
  return [(p.returncode, err) for p, (_, err) in
          zip(procs, [p.communicate(timeout=600) for p in procs])]


def _rows(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
  data = tmp_path / "data"
  one = _train([*ARGS, f"--workdir={tmp_path / 'one'}"], _env(8, data))
  out, err = one.communicate(timeout=600)
  assert one.returncode == 0, err[-3000:]
  two = [*ARGS, f"--workdir={tmp_path / 'two'}"]
  # SIGTERM reaches process 0 only: both stop at the same sync point (the runtime agrees on it a
  # few calls later), save and exit 0.
  stopped = _pair(two, data, script0=TERM_AT_PRETRAIN_2)
  saved = []
  for code, err in stopped:
    assert code == 0, err[-3000:]
    saved.append(re.findall(r"preempted: stage '(\w+)' saved its checkpoint at step (\d+)", err))
  assert saved[0] == saved[1] and len(saved[0]) == 1, stopped
  assert "process 1 of 2" in stopped[1][1]
  for code, err in _pair([*two, "--resume"], data):
    assert code == 0, err[-3000:]
  rows_one, rows_two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
  assert [(r["stage"], r["step"]) for r in rows_two] == [(r["stage"], r["step"]) for r in rows_one]
  assert len(rows_two) == 8                             # written once, by process 0
  np.testing.assert_allclose([r["loss"] for r in rows_two], [r["loss"] for r in rows_one],
                             rtol=1e-5, atol=1e-5)
  exp, names = cli._load_run(str(tmp_path / "one"))
  for i, name in enumerate(names):
    a = run.restore_players(exp, i, str(tmp_path / "one"))
    b = run.restore_players(exp, i, str(tmp_path / "two"))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b)


def test_coordinator_flags_missing_or_out_of_range_exit_2(tmp_path, capsys):
  base = ["train", f"--gin_file={EXP}/arithmetic/pretrain.gin", f"--workdir={tmp_path / 'run'}"]
  assert cli.main([*base, "--coordinator_address=localhost:1234", "--num_processes=2"]) == 2
  assert "--process_id missing" in capsys.readouterr().err
  assert cli.main([*base, "--coordinator_address=localhost:1234", "--num_processes=2",
                   "--process_id=2"]) == 2
  assert "--process_id=2 is not in [0, --num_processes=2)" in capsys.readouterr().err
  assert cli.main([*base, "--coordinator_address=localhost", "--num_processes=2",
                   "--process_id=0"]) == 2
  assert "expected HOST:PORT" in capsys.readouterr().err
  assert not (tmp_path / "run").exists()


def test_processes_given_different_configs_exit_2(tmp_path):
  """Every process hashes its operative config; the processes compare before anything is built."""
  args = [*ARGS, f"--workdir={tmp_path / 'run'}"]
  results = _pair(args, tmp_path / "data", args1=["--gin.pretrain/Stage.steps=6"])
  for code, err in results:
    assert code == 2, err[-3000:]
    assert "the operative config of processes [1] differs from process 0's" in err, err[-3000:]
  assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_a_cluster_is_detected_from_its_environment(monkeypatch):
  from gamejax import distributed
  for name in ("SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "TPU_WORKER_HOSTNAMES",
               "JAX_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
  assert distributed.cluster_detected() is None
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.cluster_detected() is None                  # one task: one process
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.cluster_detected() == "SLURM"
  monkeypatch.delenv("SLURM_NTASKS")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1")
  assert distributed.cluster_detected() == "TPU VM slice"
