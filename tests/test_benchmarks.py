"""benchmarks.against_commit: the earlier commit is unpacked whole, its benchmarks import its own
gamejax, and a commit that does not exist is a clear exit 2."""
import os
import subprocess

import pytest

from benchmarks import against_commit


def test_an_unpacked_commit_imports_its_own_gamejax(tmp_path):
  full = against_commit.unpack("HEAD", str(tmp_path))
  head = subprocess.run(["git", "-C", against_commit.REPO, "rev-parse", "HEAD"],
                        capture_output=True, text=True, check=True).stdout.strip()
  assert full == head
  assert os.path.exists(tmp_path / "benchmarks" / "grpo_step.py")
  assert os.path.realpath(against_commit._imported_from(str(tmp_path))) == os.path.realpath(
      tmp_path)


def test_a_commit_that_does_not_exist_exits_2(capsys):
  assert against_commit.main(["--commit", "0123456789abcdef"]) == 2
  assert "cannot unpack commit '0123456789abcdef'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    against_commit.main(["--cases", "grpo_a,nonsense"])
