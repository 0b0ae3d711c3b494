"""``gamejax plot --workdir=DIR [--workdir=DIR2 ...]``: PNG curves of a run's logged metrics (matplotlib, an optional
extra: ``pip install 'gamejax[plot]'``).

One figure per group of metrics found in ``metrics.jsonl`` -- exploitability, each seat's
best-response gain, each seat's reward, the judge's accuracies, Elo, a cyclic game's style
frequencies, the exact distance of a policy's mix to the game's equilibrium
(``first_move_probe``), losses -- with one curve per metric and stage, against the step. The
PNGs go to ``DIR/plots/`` (``--output`` elsewhere); the paths written are returned.
"""
from __future__ import annotations

import json
import os
import re
from typing import Mapping, Sequence

# Figure name -> the metric-name pattern it draws (the first group that matches a metric wins).
GROUPS: Sequence[tuple[str, str]] = (
    ("exploitability", r"^(exploitability|nash_conv)$"),
    ("best_response_gain", r"^best_response_gain/"),
    ("rewards", r"(^judge/.*reward|/reward_mean$)"),
    ("accuracy", r"(^judge/exact$|accuracy)"),
    ("elo", r"(^|/)elo"),
    ("policy", r"^policy/"),
    ("style", r"^style/"),
    ("equilibrium_distance", r"probe/distance$"),
    ("loss", r"(^|/)loss$"),
)


class PlotError(ValueError):
  """No metrics to plot, or matplotlib missing."""


def read_metrics(path: str) -> list[dict]:
  if not os.path.isfile(path):
    raise PlotError(f"{path}: no such file (has the run logged any step?)")
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise PlotError(f"{path}:{number}: not JSON ({e.msg})") from None
  if not rows:
    raise PlotError(f"{path}: empty")
  return rows


def series(rows: Sequence[Mapping]) -> dict[str, dict[str, tuple[list, list]]]:
  """group -> "stage: metric" -> (steps, values), for the metrics of ``GROUPS``."""
  out: dict[str, dict[str, tuple[list, list]]] = {}
  for row in rows:
    for key, value in row.items():
      if key in ("stage", "step") or not isinstance(value, (int, float)):
        continue
      group = next((g for g, pattern in GROUPS if re.search(pattern, key)), None)
      if group is None:
        continue
      steps, values = out.setdefault(group, {}).setdefault(f"{row['stage']}: {key}", ([], []))
      steps.append(row["step"])
      values.append(value)
  return out


def plot_run(workdir: str | Sequence[str], output: str | None = None) -> list[str]:
  """Writes one PNG per group of ``workdir``'s metrics (several run directories: their curves
  overlaid, labelled by folder name); returns their paths."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    raise PlotError("gamejax plot needs matplotlib: pip install 'gamejax[plot]'") from None
  workdirs = [workdir] if isinstance(workdir, str) else list(workdir)
  groups: dict[str, dict[str, tuple[list, list]]] = {}
  for w in workdirs:
    prefix = f"{os.path.basename(os.path.normpath(w))} " if len(workdirs) > 1 else ""
    for group, curves in series(read_metrics(os.path.join(w, "metrics.jsonl"))).items():
      groups.setdefault(group, {}).update({prefix + k: v for k, v in curves.items()})
  if not groups:
    raise PlotError(f"{workdirs[0]}/metrics.jsonl holds none of the plotted metrics "
                    f"({[g for g, _ in GROUPS]})")
  workdir = workdirs[0]
  title = os.path.basename(os.path.normpath(workdir)) if len(workdirs) == 1 else "runs"
  output = output or os.path.join(workdir, "plots")
  os.makedirs(output, exist_ok=True)
  written = []
  for group, curves in groups.items():
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (steps, values) in sorted(curves.items()):
      ax.plot(steps, values, label=label, linewidth=1.2)
    if group == "exploitability" and all(v > 0 for _, vs in curves.values() for v in vs):
      ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"{title}: {group}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(output, f"{group}.png")
    fig.savefig(path + ".tmp.png", dpi=110)
    os.replace(path + ".tmp.png", path)
    plt.close(fig)
    written.append(path)
  return written
