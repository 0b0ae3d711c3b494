"""SPIN: the compiled step's loss against a NumPy reference of Chen et al.'s loss, the batch layout
(demonstrations chosen, the previous iterate's answers rejected), the opponent refreshed each
iteration, held-out accuracy after each iteration (bad SPIN settings: test_cli)."""
import os

import jax
import numpy as np

from gamejax import config, run
from gamejax import step as game_step
from gamejax.models import llama
from gamejax.models.llama import LlamaConfig
from gamejax.payoffs import dpo
from gamejax.players import spin
from gamejax.records import AGENT, OPPONENT
from gamejax.run import assembly

from bigram_reference import np_log_softmax

EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
CFG = LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
BETA = 0.3


def _experiment(tmp_path, steps=4, iterations=2, **stage):
  data = config.arena(players=[("drop_carry:0", 1.0)], num_train=40, num_test=5)
  s = run.Stage(name="spin", data=data, payoff=dpo(beta=BETA), steps=steps, batch_size=3,
                seq_len=48, steps_per_call=1, init_from=None,
                spin=run.Spin(iterations=iterations, temperature=1.0), **stage)
  return run.Experiment(stages=[s], model=CFG, data_dir=str(tmp_path / "data"))


def _np_sequence_logprobs(params, moves):
  """Per row: the summed log-prob of the agent's tokens, from the model's logits, in float64."""
  logits = np.asarray(llama.apply(CFG, params, moves.tokens, moves.positions, moves.segment_ids),
                      np.float64)
  tokens, players, segments = (np.asarray(x) for x in (moves.tokens, moves.players,
                                                       moves.segment_ids))
  out = np.zeros(tokens.shape[0])
  for b in range(tokens.shape[0]):
    for t in range(tokens.shape[1] - 1):
      if segments[b, t] and segments[b, t + 1] == segments[b, t] and players[b, t + 1] == AGENT:
        out[b] += np_log_softmax(logits[b, t])[tokens[b, t + 1]]
  return out


def test_spin_step_matches_numpy_loss_and_refreshes_its_opponent(tmp_path):
  exp = _experiment(tmp_path)
  exp.validate()
  source = exp.stages[0].data.load("train", str(tmp_path / "data"))
  loader = assembly.stage_loader(exp, 0, source)
  game = assembly.stage_game(exp, 0)
  state = assembly.stage_state(exp, 0, game, assembly.initial_players(exp, 0))
  initial = jax.tree.map(np.asarray, state.params["agent"])
  step = jax.jit(lambda s, b: game_step.game_step(game, s, b))
  history = []
  for n in range(4):
    batch = next(loader)
    k_play = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)[0]
    moves, _ = game.play(state, batch, k_play)
    p = batch["tokens"].shape[0]
    # Rows [0, P): the demonstrations; rows [P, 2P): the same prompts, the opponent's answers.
    for i in range(p):
      real = np.asarray(moves.segment_ids[i]) > 0
      np.testing.assert_array_equal(np.asarray(moves.tokens[i])[real],
                                    batch["tokens"][i][batch["segment_ids"][i] > 0])
      for row in (i, p + i):
        t, who = np.asarray(moves.tokens[row]), np.asarray(moves.players[row])
        np.testing.assert_array_equal(t[who == OPPONENT], batch["prompt"][i][-batch[
            "prompt_lengths"][i]:])
        assert (who == AGENT).any()
    # SPIN's loss (Chen et al. 2024, eq. 4.7 with the logistic loss), from NumPy log-probs.
    lp = _np_sequence_logprobs(state.params["agent"], moves)
    ref = _np_sequence_logprobs(state.frozen[spin.OPPONENT], moves)
    margin = BETA * ((lp[:p] - ref[:p]) - (lp[p:] - ref[p:]))
    want = np.mean(np.log1p(np.exp(-margin)))
    state_before = state
    state, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["agent/loss"]), want, rtol=2e-4, atol=1e-5)
    history.append((state_before, state))
  # The opponent is the previous iterate: the initial params for steps 1-2, step 2's after.
  for n, (before, after) in enumerate(history, start=1):
    want_opponent = initial if n <= 2 else jax.tree.map(np.asarray, history[1][1].params["agent"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray,
                                                             before.frozen[spin.OPPONENT]),
                 want_opponent)
  moved = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(history[1][1].params["agent"]),
                                                 jax.tree.leaves(initial))]
  assert any(moved)           # so the check above tells the two opponents apart


def test_spin_experiment_reports_accuracy_after_each_iteration(tmp_path):
  """spin.gin as written, shrunk: three SPIN stages (here of two rounds each, evaluated after
  each round), then the control."""
  config.parse([f"{EXP}/arithmetic/spin.gin", f"{EXP}/models/tiny.gin"],
               ["pretrain/Stage.steps=2", "sft/Stage.steps=2", "SPIN_STEPS=4", "SPIN_BATCH=2",
                "spin/Spin.iterations=2", "sft_continued/Stage.steps=4",
                "sft_continued/Stage.eval_every=2", "spin/Stage.eval_every=2",
                "Stage.steps_per_call=2", "BATCH_SIZE=4", "SEQ_LEN=64",
                "pretrain/arena.num_train=40", "sft/arena.num_train=40",
                "pretrain/arena.num_test=5", "sft/arena.num_test=5", "eval/arena.num_test=6",
                "Evaluation.num_examples=6", "Evaluation.batch_size=6",
                f"Experiment.data_dir='{tmp_path / 'data'}'"])
  exp = config.build_experiment()
  assert [s.name for s in exp.stages] == ["pretrain", "sft", "spin", "spin2", "spin3",
                                          "sft_continued"]
  assert [s.init_from for s in exp.stages[2:]] == ["sft", "previous", "previous", "sft"]
  summary = run.run_experiment(exp, str(tmp_path / "run"), progress=False, log=lambda _: None)
  got = summary["spin"]
  assert sorted(got["accuracy_at"], key=int) == ["2", "4"]
  assert got["accuracy_at"]["4"] == got["accuracy"]
  assert "heldout_loss" in got
  assert all("accuracy" in summary[name] for name in ("spin2", "spin3"))
  rows = [r for r in map(__import__("json").loads, open(tmp_path / "run" / "metrics.jsonl"))
          if r["stage"] == "spin"]
  assert [r["step"] for r in rows if "eval/accuracy" in r] == [2]
  assert {"spin/identical", "spin/opponent_exact", "agent/reward_margin"} <= set(rows[0])
  assert sorted(summary["sft_continued"]["accuracy_at"], key=int) == ["2", "4"]   # the control
