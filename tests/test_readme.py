"""The README's Python example (a user-written payoff) runs as written and trains."""
import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_payoff_example_trains(tmp_path, monkeypatch):
  text = open(os.path.join(ROOT, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python example"
  code = blocks[0]
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("GAMEJAX_DATA_DIR", str(tmp_path / "data"))
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)    # noqa: S102 -- the example, as written
  summary = scope["summary"]
  assert np.isfinite(summary["sft"]["loss"]) and summary["sft"]["steps"] == 20
  rows = [l for l in open(tmp_path / "runs/custom_payoff/metrics.jsonl")]
  assert "agent/confidence/entropy" in rows[-1] and "agent/sft/loss" in rows[-1]
