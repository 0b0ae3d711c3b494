"""The Cloud TPU and SLURM launch scripts (tpu/), run against a fake ``gcloud``.

The fake ``gcloud`` records its argv; remote commands (what ``--command=`` asks each worker's shell
to run) are run here by bash in a fake home directory with fake ``gamejax``, ``pip`` and
``python3.11``, so quoting, the detached launch and the SIGTERM stop are checked end to end.
The scripts run with ``python -S`` (no site-packages): they need the standard library only.
"""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "tpu")
PROJECT, ZONE = "my-project", "us-west4-a"
WHERE = [f"--project={PROJECT}", f"--zone={ZONE}"]

# Records {"prog": name, "argv": [...], "cwd": ..., "pid": ...} as one JSON line; a SIGTERM is
# recorded too, then it exits 0 (as gamejax does after its checkpoint). $FAKE_STDOUT is printed;
# $FAKE_SECONDS is how long it lives.
RECORDER = f"""#!{sys.executable} -S
import json, os, signal, sys, time
def record(**entry):
  with open(os.environ["FAKE_RECORD"], "a") as f:
    f.write(json.dumps(dict(prog=os.path.basename(sys.argv[0]), **entry)) + "\\n")
def on_term(*_):
  record(signal="TERM")
  sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
record(argv=sys.argv[1:], cwd=os.getcwd(), pid=os.getpid())
print(os.environ.get("FAKE_STDOUT", ""))
time.sleep(float(os.environ.get("FAKE_SECONDS", "0")))
"""

# ``python3.11 -m venv DIR`` makes DIR/bin/{pip,python,activate}: recorders and a PATH prefix.
FAKE_PYTHON = f"""#!/bin/sh
[ "$1 $2" = "-m venv" ] || exit 3
mkdir -p "$3/bin" && cp "$FAKE_BIN/recorder" "$3/bin/pip" && cp "$FAKE_BIN/recorder" "$3/bin/python"
echo 'PATH="'"$3"'/bin:$PATH"' > "$3/bin/activate"
"""


def _write(path, text, mode=0o755):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, mode)


@pytest.fixture
def fake(tmp_path):
  """Fake gcloud (and friends) first on PATH, a fake home, and the record they write."""
  bin_dir, home = tmp_path / "bin", tmp_path / "home"
  _write(bin_dir / "recorder", RECORDER)
  for prog in ("gcloud", "sudo"):
    os.symlink(bin_dir / "recorder", bin_dir / prog)
  _write(bin_dir / "python3.11", FAKE_PYTHON)
  home.mkdir()
  env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
  env.update(PATH=f"{bin_dir}:{env['PATH']}", HOME=str(home), FAKE_BIN=str(bin_dir),
             FAKE_RECORD=str(tmp_path / "record.jsonl"), TMPDIR=str(tmp_path))

  class Fake:
    path, record_file = tmp_path, tmp_path / "record.jsonl"

    def __init__(self):
      self.env = env

    def run(self, script, *args, **env_overrides):
      """Runs tpu/SCRIPT.py with ARGS; the completed process."""
      return subprocess.run([sys.executable, "-S", os.path.join(TPU, f"{script}.py"), *args],
                            capture_output=True, text=True, env={**env, **env_overrides},
                            timeout=30)

    def records(self, prog=None):
      """What the fakes recorded, in order (only PROG's, if given)."""
      if not self.record_file.exists():
        return []
      rows = [json.loads(l) for l in self.record_file.read_text().splitlines()]
      return [r for r in rows if prog is None or r["prog"] == prog]

    def gcloud_calls(self):
      return [r["argv"] for r in self.records("gcloud")]

    def remote(self, command, **env_overrides):
      """Runs a worker's --command with bash, in the fake home, as gcloud ssh would."""
      return subprocess.run(["bash", "-c", command], capture_output=True, text=True,
                            cwd=env["HOME"], env={**env, **env_overrides}, timeout=30)

  return Fake()


def _command_flag(argv):
  """The value of --command= in a recorded gcloud argv."""
  [command] = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command


def _tiny_checkout(path):
  """A git repository with a gin file under experiments/; its path."""
  _write(path / "experiments" / "tiny.gin", "Stage.name = 'x'\n", 0o644)
  _write(path / "pyproject.toml", "[project]\nname = 'gamejax'\n", 0o644)
  git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(["git", "init", "-q", str(path)], check=True)
  subprocess.run(git + ["add", "."], check=True)
  subprocess.run(git + ["commit", "-q", "-m", "tiny"], check=True)
  return str(path)


# --- create / wait -------------------------------------------------------------------------------

def test_create_single_host_is_a_queued_resource(fake):
  done = fake.run("create", "gj", "--accelerator-type=v5litepod-8", *WHERE)
  assert done.returncode == 0, done.stderr
  assert fake.gcloud_calls() == [[
      "compute", "tpus", "queued-resources", "create", "gj", "--node-id=gj",
      "--accelerator-type=v5litepod-8", "--runtime-version=v2-alpha-tpuv5-lite",
      f"--project={PROJECT}", f"--zone={ZONE}"]]


def test_create_multi_host_spot_slice_and_wait_until_active(fake):
  done = fake.run("create", "gj", "--accelerator-type=v4-32", "--spot", "--wait",
                  "--interval=0", *WHERE, FAKE_STDOUT="ACTIVE")
  assert done.returncode == 0, done.stderr
  create, describe = fake.gcloud_calls()
  assert create[:5] == ["compute", "tpus", "queued-resources", "create", "gj"]
  assert {"--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base", "--spot",
          "--node-id=gj"} <= set(create)
  assert describe == ["compute", "tpus", "queued-resources", "describe", "gj",
                      "--format=value(state.state)", f"--project={PROJECT}", f"--zone={ZONE}"]


@pytest.mark.parametrize("state,code", [("SUSPENDED", 1), ("FAILED", 1)])
def test_wait_gives_up_on_a_dead_request(fake, state, code):
  done = fake.run("wait", "gj", "--interval=0", *WHERE, FAKE_STDOUT=state)
  assert done.returncode == code and state in done.stderr
  assert len(fake.gcloud_calls()) == 1


def test_wait_polls_until_the_timeout(fake):
  done = fake.run("wait", "gj", "--interval=0.01", "--timeout=0.2", *WHERE,
                  FAKE_STDOUT="WAITING_FOR_RESOURCES")
  assert done.returncode == 1 and "not ACTIVE" in done.stderr
  assert len(fake.gcloud_calls()) >= 2


def test_create_without_a_known_runtime_version_exits_2(fake):
  done = fake.run("create", "gj", "--accelerator-type=v9x-8", *WHERE)
  assert done.returncode == 2 and "--runtime-version" in done.stderr
  assert fake.records() == []


# --- install -------------------------------------------------------------------------------------

def test_install_copies_the_commit_to_all_workers_and_installs_it(fake):
  source = _tiny_checkout(fake.path / "checkout")
  done = fake.run("install", "gj", f"--source={source}", *WHERE)
  assert done.returncode == 0, done.stderr
  scp, ssh = fake.gcloud_calls()
  archive = str(fake.path / "gamejax-gj.tar.gz")
  assert scp == ["compute", "tpus", "tpu-vm", "scp", archive, "gj:gamejax.tar.gz",
                 "--worker=all", f"--project={PROJECT}", f"--zone={ZONE}"]
  assert ssh[:6] == ["compute", "tpus", "tpu-vm", "ssh", "gj", "--worker=all"]
  with tarfile.open(archive) as tar:
    assert "experiments/tiny.gin" in tar.getnames()
  # A worker: the archive arrives in its home (scp), then its shell runs the command.
  home = fake.env["HOME"]
  os.replace(archive, os.path.join(home, "gamejax.tar.gz"))
  worker = fake.remote(_command_flag(ssh))
  assert worker.returncode == 0, worker.stderr
  assert os.path.isfile(os.path.join(home, "gamejax", "experiments", "tiny.gin"))
  pip = [r["argv"] for r in fake.records("pip")]
  assert ["install", "-q", "-e", os.path.join(home, "gamejax"), "jax[tpu]"] in pip
  assert fake.records("sudo") == []                 # python3.11 is there: no apt-get


def test_install_refuses_a_remote_dir_that_is_home(fake):
  done = fake.run("install", "gj", "--remote-dir=.", *WHERE)
  assert done.returncode == 2 and "--remote-dir" in done.stderr
  assert fake.records() == []


# --- launch, logs, stop, delete ------------------------------------------------------------------

OVERRIDES = ["--gin.Stage.name='my stage'", "--gin.Experiment.data_dir='/mnt/a b'",
             '--gin.Stage.note="it\'s $HOME; `true` & done"']


def _worker_home(fake):
  """A worker's home as install.py leaves it: the checkout and an environment with gamejax."""
  home = fake.env["HOME"]
  os.makedirs(os.path.join(home, "gamejax"))
  _write(os.path.join(home, "gamejax-venv", "bin", "gamejax"), RECORDER)
  _write(os.path.join(home, "gamejax-venv", "bin", "activate"),
         f'PATH="{home}/gamejax-venv/bin:$PATH"\n', 0o644)
  return home


def _wait_for(predicate, seconds=10.0):
  deadline = time.monotonic() + seconds
  while not predicate():
    assert time.monotonic() < deadline, "timed out"
    time.sleep(0.02)


def test_launch_runs_gamejax_train_on_all_workers_with_the_overrides_exactly(fake):
  done = fake.run("launch", "gj", "--gin_file=experiments/arithmetic/grpo.gin",
                  "--gin_file=experiments/models/tiny.gin", "--workdir=/mnt/shared/runs/a b",
                  "--resume", *OVERRIDES, *WHERE)
  assert done.returncode == 0, done.stderr
  [ssh] = fake.gcloud_calls()
  assert ssh[:6] == ["compute", "tpus", "tpu-vm", "ssh", "gj", "--worker=all"]
  home = _worker_home(fake)
  worker = fake.remote(_command_flag(ssh))
  assert worker.returncode == 0, worker.stderr
  _wait_for(lambda: fake.records("gamejax"))
  [train] = fake.records("gamejax")
  assert train["argv"] == ["train", "--gin_file=experiments/arithmetic/grpo.gin",
                           "--gin_file=experiments/models/tiny.gin",
                           "--workdir=/mnt/shared/runs/a b", "--no_progress", "--resume",
                           *OVERRIDES]
  assert train["cwd"] == os.path.join(home, "gamejax")
  assert open(os.path.join(home, "gamejax-train.pid")).read().strip() == str(train["pid"])
  assert os.path.exists(os.path.join(home, "gamejax-train.log"))


def test_launch_refuses_a_second_run_and_stop_sends_sigterm_on_all_workers(fake):
  fake.run("launch", "gj", "--gin_file=g.gin", "--workdir=/w", *WHERE)
  fake.run("stop", "gj", "--timeout=20", *WHERE)
  [launch, stop] = fake.gcloud_calls()
  assert stop[:6] == ["compute", "tpus", "tpu-vm", "ssh", "gj", "--worker=all"]
  home = _worker_home(fake)
  assert fake.remote(_command_flag(launch), FAKE_SECONDS="60").returncode == 0
  _wait_for(lambda: fake.records("gamejax"))
  pid = fake.records("gamejax")[0]["pid"]
  try:
    again = fake.remote(_command_flag(launch))
    assert again.returncode == 1 and "running already" in again.stderr
    stopped = fake.remote(_command_flag(stop))
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert fake.records("gamejax")[-1] == {"prog": "gamejax", "signal": "TERM"}
    assert len(fake.records("gamejax")) == 2                    # the second launch ran nothing
  finally:
    try:
      os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  again = fake.remote(_command_flag(stop))                     # nothing left to stop
  assert again.returncode == 0 and "not running" in again.stdout
  assert os.path.isdir(os.path.join(home, "gamejax"))


@pytest.mark.parametrize("flag", ["--gin.Stage.name", "--gin.=3"])
def test_launch_rejects_a_binding_without_a_value(fake, flag):
  done = fake.run("launch", "gj", "--gin_file=g.gin", "--workdir=/w", flag, *WHERE)
  assert done.returncode == 2 and flag in done.stderr
  assert fake.records() == []


def test_launch_needs_an_absolute_workdir(fake):
  done = fake.run("launch", "gj", "--gin_file=g.gin", "--workdir=runs/a", *WHERE)
  assert done.returncode == 2 and "--workdir=runs/a" in done.stderr
  assert fake.records() == []


def test_logs_follow_worker_0_or_all(fake):
  assert fake.run("logs", "gj", *WHERE).returncode == 0
  assert fake.run("logs", "gj", "--worker=all", "--lines=5", "--no-follow", *WHERE).returncode == 0
  first, second = fake.gcloud_calls()
  assert first == ["compute", "tpus", "tpu-vm", "ssh", "gj", "--worker=0",
                   "--command=tail -n 100 -F ~/gamejax-train.log", *WHERE]
  assert "--worker=all" in second
  home = fake.env["HOME"]
  _write(os.path.join(home, "gamejax-train.log"), "".join(f"{i}\n" for i in range(9)), 0o644)
  assert fake.remote(_command_flag(second)).stdout == "4\n5\n6\n7\n8\n"


def test_delete_forces_out_the_queued_resource_without_a_prompt(fake):
  assert fake.run("delete", "gj", *WHERE).returncode == 0
  assert fake.gcloud_calls() == [["compute", "tpus", "queued-resources", "delete", "gj",
                                  "--force", "--quiet", *WHERE]]


def test_ssh_and_fetch(fake):
  assert fake.run("ssh", "gj", "--command=df -h /mnt/shared", *WHERE).returncode == 0
  assert fake.run("fetch", "gj", "/tmp/runs/a", "runs/a", *WHERE).returncode == 0
  assert fake.gcloud_calls() == [
      ["compute", "tpus", "tpu-vm", "ssh", "gj", "--worker=all", "--command=df -h /mnt/shared",
       *WHERE],
      ["compute", "tpus", "tpu-vm", "scp", "--recurse", "gj:/tmp/runs/a", "runs/a", "--worker=0",
       *WHERE]]


# --- --dry-run, project and zone -----------------------------------------------------------------

def _session(accelerator):
  """Each script's arguments for one run on a TPU of type ACCELERATOR, as (script, args)."""
  return [("create", ["gj", f"--accelerator-type={accelerator}", "--spot", "--wait"]),
          ("wait", ["gj", "--interval=0"]),
          ("install", ["gj"]),
          ("launch", ["gj", "--gin_file=experiments/arithmetic/grpo.gin", "--workdir=/mnt/s/a b",
                      *OVERRIDES]),
          ("logs", ["gj", "--worker=all"]),
          ("stop", ["gj"]),
          ("fetch", ["gj", "/mnt/s/a b", "out"]),
          ("delete", ["gj"])]


def test_dry_run_prints_exactly_the_commands_and_runs_nothing(fake):
  for script, args in _session("v5litepod-8"):
    done = fake.run(script, *args, "--dry-run", *WHERE)
    assert done.returncode == 0, (script, done.stderr)
    lines = done.stdout.splitlines()
    assert lines and all(shlex.split(l)[0] in ("gcloud", "git") for l in lines), script
    assert fake.records() == [], script
    assert not os.path.exists(fake.path / "gamejax-gj.tar.gz")
    if script != "install":               # the printed commands are the ones a real run makes
      assert fake.run(script, *args, *WHERE, FAKE_STDOUT="ACTIVE").returncode == 0, script
      assert fake.gcloud_calls() == [shlex.split(l)[1:] for l in lines], script
      fake.record_file.unlink()


@pytest.mark.parametrize("accelerator,runtime", [("v5litepod-8", "v2-alpha-tpuv5-lite"),
                                                 ("v4-32", "tpu-ubuntu2204-base")])
def test_dry_run_of_single_and_multi_host_spot_requests(fake, accelerator, runtime):
  done = fake.run("create", "gj", f"--accelerator-type={accelerator}", "--spot", "--wait",
                  "--dry-run", *WHERE)
  assert done.returncode == 0, done.stderr
  create, describe = map(shlex.split, done.stdout.splitlines())
  assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "gj"]
  assert {f"--accelerator-type={accelerator}", f"--runtime-version={runtime}", "--spot"} <= set(
      create)
  assert describe[3:5] == ["queued-resources", "describe"]
  assert fake.records() == []


def test_missing_project_or_zone_exits_2_naming_it_and_runs_nothing(fake):
  cases = [(script, args, "both") for script, args in _session("v4-32")]
  cases += [(script, args, missing) for script, args in _session("v4-32")[:4:3]
            for missing in ("project", "zone")]
  for script, args, missing in cases:
    given = [f for f in WHERE if missing not in ("both", f[2:].split("=")[0])]
    done = fake.run(script, *args, *given)
    assert done.returncode == 2, (script, missing, done.stderr)
    for name in ("project", "zone"):
      assert (f"--{name}" in done.stderr) == (missing in (name, "both")), done.stderr
    assert fake.records() == [], script


def test_project_and_zone_default_from_the_environment(fake):
  done = fake.run("delete", "gj", CLOUDSDK_CORE_PROJECT="p1", CLOUDSDK_COMPUTE_ZONE="z1")
  assert done.returncode == 0, done.stderr
  assert fake.gcloud_calls()[0][-2:] == ["--project=p1", "--zone=z1"]


# --- the README and the SLURM script -------------------------------------------------------------

def _readme_commands():
  """Every ``python tpu/...`` command in tpu/README.md's shell blocks, as argv lists."""
  text = open(os.path.join(TPU, "README.md")).read()
  commands = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.splitlines():
      argv = shlex.split(line)
      if len(argv) > 1 and argv[0] == "python" and argv[1].startswith("tpu/"):
        commands.append(argv[1:])
  return commands


def test_readme_commands_are_accepted(fake):
  commands = _readme_commands()
  assert len(commands) >= 15 and {c[0] for c in commands} >= {
      f"tpu/{s}.py" for s in ("create", "install", "launch", "logs", "stop", "delete", "ssh")}
  env = dict(CLOUDSDK_CORE_PROJECT=PROJECT, CLOUDSDK_COMPUTE_ZONE=ZONE)
  for script, *args in commands:
    done = fake.run(os.path.basename(script)[:-3], *args, "--dry-run", **env)
    assert done.returncode == 0 and done.stdout, (script, args, done.stderr)
  assert fake.records() == []


def _sbatch(fake, *args, **env):
  venv = fake.path / "venv"
  _write(venv / "bin" / "activate", f'PATH="{fake.path}/bin:$PATH"\n', 0o644)
  os.symlink(fake.path / "bin" / "recorder", fake.path / "bin" / "srun")
  env = {**fake.env, "VENV": str(venv), **env}
  return subprocess.run(["bash", os.path.join(TPU, "slurm", "train.sbatch"), *args],
                        capture_output=True, text=True, env=env, timeout=30)


def test_slurm_script_runs_gamejax_train_once_per_node_with_resume(fake):
  done = _sbatch(fake, *OVERRIDES, GIN_FILE="experiments/arithmetic/grpo.gin "
                 "experiments/models/tiny.gin", WORKDIR="/shared/runs/a b")
  assert done.returncode == 0, done.stderr
  [srun] = fake.records("srun")
  assert srun["argv"] == ["--kill-on-bad-exit=1", "gamejax", "train",
                          "--gin_file=experiments/arithmetic/grpo.gin",
                          "--gin_file=experiments/models/tiny.gin",
                          "--workdir=/shared/runs/a b", "--resume", "--no_progress", *OVERRIDES]
  header = open(os.path.join(TPU, "slurm", "train.sbatch")).read()
  assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --signal=TERM@" in header


def test_slurm_script_needs_a_workdir(fake):
  done = _sbatch(fake, GIN_FILE="experiments/arithmetic/grpo.gin")
  assert done.returncode != 0 and "WORKDIR" in done.stderr
  assert fake.records() == []
