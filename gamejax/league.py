"""``gamejax league --workdir=DIR``: the win-rate matrix and Elo ratings of a league of past selves.

A stage whose seat is sat by a league (``players.selfplay.league``) keeps its last snapshots in
the game state (saved with every checkpoint). This command restores the stage's latest
checkpoint, lets every member -- and the learner itself, as ``current`` -- play every other in
the agent's seat against the opponent's, exactly where the game can (a matrix game: the
probability that the first wins, ties counted half), and fits Elo ratings to the win rates
(Bradley-Terry on the logistic scale of 400 / ln 10, anchored at a mean of 1000). It prints both,
writes them to ``DIR/league.json`` and, with matplotlib, a heatmap ``DIR/plots/league.png``.

>>> r = elo(np.array([[0.5, 0.75], [0.25, 0.5]]))
>>> round(float(r[0] - r[1]), 2)     # 400 log10(0.75 / 0.25)
190.85
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from gamejax.players import selfplay

ELO_SCALE = 400.0 / np.log(10.0)


class LeagueError(ValueError):
  """No league in the run, or a game that cannot score one."""


def elo(scores: np.ndarray, iters: int = 2000) -> np.ndarray:
  """Elo ratings whose logistic predictions best fit ``scores[i, j]`` (i's expected score
  against j; the diagonal is ignored): the Bradley-Terry maximum likelihood of the win rates,
  mean 1000."""
  s = np.asarray(scores, np.float64)
  n = s.shape[0]
  pair = 0.5 * (s + (1.0 - s.T))               # i's score against j from both seatings
  off = ~np.eye(n, dtype=bool)
  r = np.zeros(n)
  for _ in range(iters):                       # gradient ascent on the log-likelihood (concave)
    p = 1.0 / (1.0 + np.exp(-(r[:, None] - r[None, :])))
    grad = np.where(off, pair - p, 0.0).sum(1)
    r += 0.5 * grad / max(n - 1, 1)
    r -= r.mean()
  return 1000.0 + ELO_SCALE * r


def league_members(stage, players: dict, frozen: dict) -> tuple[list[str], list[Any]]:
  """The league's members (oldest first) and the learner it follows, as ``current``."""
  leagues = {n: f for n, f in stage.all_followers.items() if f.kind == "league"}
  if not leagues:
    raise LeagueError(f"stage {stage.name!r} has no league (seats or followers with "
                      "league(learner, size, every))")
  name, follower = sorted(leagues.items())[0]
  value = frozen[name]
  count = int(value[selfplay.LEAGUE_COUNT])
  size = follower.size
  first = max(count - size, 0)
  labels, params = [], []
  for k in range(first, count):            # snapshot k sits in slot k % size
    labels.append(f"snapshot {k} (step {k * follower.every})")
    params.append(selfplay.league_member(value, k % size))
  labels.append("current")
  params.append(players[follower.learner])
  return labels, params


def league_table(labels: Sequence[str], scores: np.ndarray, ratings: np.ndarray) -> str:
  width = max(len(label) for label in labels)
  lines = [f"{'player'.ljust(width)}  elo      " + "  ".join(f"{i:>5}" for i in range(len(labels)))]
  for i, label in enumerate(labels):
    lines.append(f"{label.ljust(width)}  {ratings[i]:7.1f}  "
                 + "  ".join(f"{scores[i, j]:5.3f}" for j in range(len(labels))))
  return "\n".join(lines)


def write_heatmap(path: str, labels: Sequence[str], scores: np.ndarray, ratings: np.ndarray):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(1.0 + 0.6 * len(labels), 0.8 + 0.5 * len(labels)))
  im = ax.imshow(scores, vmin=0.0, vmax=1.0, cmap="RdBu")
  names = [f"{label} [{r:.0f}]" for label, r in zip(labels, ratings)]
  ax.set_xticks(range(len(labels)), [str(i) for i in range(len(labels))])
  ax.set_yticks(range(len(labels)), names, fontsize=7)
  ax.set_xlabel("opponent seat")
  ax.set_title("win rate of the agent seat (row) [Elo]", fontsize=9)
  fig.colorbar(im, ax=ax)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig.savefig(path + ".tmp.png", dpi=110)
  os.replace(path + ".tmp.png", path)
  plt.close(fig)


def run_league(exp, index: int, workdir: str, log=print) -> dict:
  from gamejax import run
  stage = exp.stages[index]
  if stage.game is None or not hasattr(stage.game, "win_rates"):
    raise LeagueError(f"stage {stage.name!r}: its game cannot score a league exactly")
  players, frozen = run.restore_players(exp, index, workdir)
  labels, params = league_members(stage, players, frozen)
  apply = run.assembly.learner_apply(exp, stage, "policy")
  scores = stage.game.win_rates(apply, params)
  ratings = elo(scores)
  log(league_table(labels, scores, ratings))
  out = {"stage": stage.name, "players": labels, "win_rates": scores.tolist(),
         "elo": ratings.tolist()}
  run.write_json_atomic(os.path.join(workdir, "league.json"), out)
  try:
    write_heatmap(os.path.join(workdir, "plots", "league.png"), labels, scores, ratings)
    log(os.path.join(workdir, "plots", "league.png"))
  except ImportError:
    log("(no heatmap: matplotlib is not installed; pip install 'gamejax[plot]')")
  return out
