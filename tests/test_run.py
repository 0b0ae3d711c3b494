"""Runs end to end: the CLI writes its run directory; --resume continues with the same data order."""
import json
import os

import jax
import numpy as np
import pytest

from gamejax import cli, config, run, sharding
from gamejax.models.llama import LlamaConfig
from gamejax.payoffs import imitation

EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
TINY_ARENA = [f"--gin_file={EXP}/arithmetic/pipeline.gin", f"--gin_file={EXP}/models/tiny.gin",
              "--gin.pretrain/Stage.steps=4", "--gin.sft/Stage.steps=4", "--gin.Stage.steps_per_call=2",
              "--gin.BATCH_SIZE=4", "--gin.SEQ_LEN=64", "--gin.pretrain/arena.num_train=200",
              "--gin.sft/arena.num_train=200", "--gin.eval/arena.num_test=20",
              "--gin.Evaluation.num_examples=20", "--gin.Evaluation.batch_size=10",
              "--gin.RL_STEPS=4", "--gin.reward_model/Stage.steps=4", "--gin.GROUP_SIZE=2",
              "--gin.grpo/arena.num_train=200", "--gin.arena_preferences.num_train=100",
              "--gin.arena_preferences.num_test=20", "--gin.pretrain/arena.num_test=20",
              "--gin.sft/arena.num_test=20", "--gin.grpo/arena.num_test=20", "--no_progress"]
STAGES = ("pretrain", "sft", "sft_continued", "reward_model", "grpo", "grpo_rm")


def _tiny_experiment(data_dir, steps=8):
  stage = run.Stage(name="sft", data=config.arena(players=[("perfect", 1.0)], num_train=100,
                                                   num_test=10),
                    payoff=imitation(["agent"]), steps=steps, batch_size=4, seq_len=64,
                    steps_per_call=2, checkpoint_every=4)
  return run.Experiment(stages=[stage], data_dir=str(data_dir),
                        model=LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64))


def test_resume_continues_with_same_data_order(tmp_path):
  exp = _tiny_experiment(tmp_path / "data")
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  straight = run.run_stage(exp, 0, None, str(tmp_path / "a"), mesh, progress=False, log=lambda _: None)
  os.makedirs(tmp_path / "b")
  run.run_stage(exp, 0, None, str(tmp_path / "b"), mesh, progress=False, log=lambda _: None,
                stop_after_steps=4)                        # "interrupted" after a checkpoint at 4
  resumed = run.run_stage(exp, 0, None, str(tmp_path / "b"), mesh, progress=False,
                          log=lambda _: None)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7),
               straight.params, resumed.params)
  steps = lambda d: [json.loads(l)["step"] for l in open(tmp_path / d / "metrics.jsonl")]
  assert steps("a") == [2, 4, 6, 8] and steps("b") == [2, 4, 6, 8]
  losses = lambda d: [json.loads(l)["loss"] for l in open(tmp_path / d / "metrics.jsonl")]
  np.testing.assert_allclose(losses("a"), losses("b"), rtol=1e-6)


@pytest.mark.slow
def test_cli_pipeline_writes_run_directory_and_evaluates(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("GAMEJAX_DATA_DIR", str(tmp_path / "data"))
  work = tmp_path / "run"
  assert cli.main(["train", *TINY_ARENA, f"--workdir={work}"]) == 0
  out = capsys.readouterr().out
  assert "demonstrator" in out and "pretrain" in out and "sft" in out and "held-out acc" in out
  assert sorted(os.listdir(work)) == ["checkpoints", "config.gin", "environment.json", "metrics.jsonl",
                                       "summary.json"]
  summary = json.load(open(work / "summary.json"))
  assert summary["demonstrator"]["player"] == "drop_carry:0"
  assert summary["pretrain"]["heldout_records"] == summary["sft"]["heldout_records"] == 20
  for stage in STAGES:
    held_out = "pair_accuracy" if stage == "reward_model" else "accuracy"
    assert 0.0 <= summary[stage][held_out] <= 1.0 and summary[stage]["steps"] == 4
    assert np.isfinite(summary[stage]["loss"]) and summary[stage]["tokens_per_s"] > 0
    assert stage in out
  for stage in ("grpo", "grpo_rm"):      # the agent played: its events are counted
    assert summary[stage]["skipped_nonfinite"] == 0 and summary[stage]["no_stop_completions"] >= 0
  rows = [json.loads(l) for l in open(work / "metrics.jsonl")]
  assert [(r["stage"], r["step"]) for r in rows] == [(s, k) for s in STAGES for k in (2, 4)]
  assert "judge/exact" in rows[-3] and "play/completion_tokens" in rows[-1]
  assert "sft/Stage.steps = 4" in (work / "config.gin").read_text()

  # Resuming a finished run trains nothing more; eval reads the latest checkpoint.
  assert cli.main(["train", *TINY_ARENA, f"--workdir={work}", "--resume"]) == 0
  assert len(open(work / "metrics.jsonl").readlines()) == 2 * len(STAGES)
  capsys.readouterr()
  assert cli.main(["eval", f"--workdir={work}"]) == 0          # the last stage by default
  evaluated = json.loads(capsys.readouterr().out)
  assert evaluated["grpo_rm"]["accuracy"] == pytest.approx(summary["grpo_rm"]["accuracy"])
  for stage, key in (("sft", "accuracy"), ("reward_model", "pair_accuracy")):
    assert cli.main(["eval", f"--workdir={work}", f"--stage={stage}"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated[stage][key] == pytest.approx(summary[stage][key])

  # A resume with a different config is refused (--overwrite: test_own_text_...).
  assert cli.main(["train", *TINY_ARENA, "--gin.sft/Stage.steps=6", f"--workdir={work}", "--resume"]) == 2


def test_ppo_stage_plays_with_an_actor_critic(tmp_path):
  """A PPO stage from gin: the actor-critic samples, prepare + 2 x 2 minibatch updates run in the
  step, and the next stage starts from its policy part."""
  config.parse([f"{EXP}/arithmetic/ppo.gin", f"{EXP}/models/tiny.gin"],
               ["ppo/Stage.steps=2", "Stage.steps_per_call=2", "COMPLETIONS_PER_PROMPT=2",
                "ppo/Stage.batch_size=2", "ppo/arena.num_train=50", "ppo/arena.num_test=10",
                "eval/arena.num_test=10",
                "Evaluation.num_examples=10", "Evaluation.batch_size=10",
                f"Experiment.data_dir='{tmp_path / 'data'}'"])
  exp = config.build_experiment()
  index = [s.name for s in exp.stages].index("ppo")
  stage = exp.stages[index]
  assert (stage.player, stage.epochs, stage.minibatches) == ("policy_value", 4, 2)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  result = run.run_stage(exp, index, None, str(tmp_path / "run"), mesh, progress=False,
                         eval_examples=run.load_eval_examples(exp), log=lambda _: None)
  assert sorted(result.params) == ["agent"] and sorted(result.params["agent"]) == ["policy", "value"]
  assert 0.0 <= result.metrics["accuracy"] <= 1.0 and result.metrics["skipped_nonfinite"] == 0
  row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
  assert {"agent/value_loss", "agent/explained_variance", "judge/exact"} <= set(row)
  restored = run.restore_params(exp, index, str(tmp_path / "run"))
  jax.tree.map(np.testing.assert_array_equal, restored, result.params)


@pytest.mark.parametrize("name, metric", [
    ("dpo", "agent/reward_margin"), ("ipo", "agent/reward_margin"),
    ("rloo", "agent/rloo/reward_mean"), ("reward_model", "agent/accuracy"),
    ("grpo_retry", "judge/exact"), ("sppo", "agent/win_rate_mean"),
    ("nash_md", "judge/preference")])
def test_each_arithmetic_experiment_plays_its_last_stage(tmp_path, name, metric):
  """experiments/arithmetic/<name>.gin builds; its last stage runs two steps of its game."""
  stage = name.split("_retry")[0]
  config.parse([f"{EXP}/arithmetic/{name}.gin", f"{EXP}/models/tiny.gin"],
               [f"{stage}/Stage.steps=2", "Stage.steps_per_call=2", "GROUP_SIZE=2",
                f"{stage}/Stage.batch_size=4", "rloo/arena.num_train=50", "grpo/arena.num_train=50",
                "rloo/arena.num_test=10", "grpo/arena.num_test=10",
                "arena_preferences.num_train=40", "arena_preferences.num_test=10",
                "eval/arena.num_test=10", "Evaluation.num_examples=10",
                "Evaluation.batch_size=10", f"Experiment.data_dir='{tmp_path / 'data'}'"])
  exp = config.build_experiment()
  index = len(exp.stages) - 1
  assert exp.stages[index].name == stage
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  result = run.run_stage(exp, index, None, str(tmp_path / "run"), mesh, progress=False,
                         eval_examples=run.load_eval_examples(exp), log=lambda _: None)
  assert np.isfinite(result.metrics["loss"]) and result.metrics["skipped_nonfinite"] == 0
  row = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
  assert metric in row, sorted(row)


def test_resume_restores_the_counted_events(tmp_path):
  """Counts of a stage interrupted after a checkpoint and resumed equal an uninterrupted run's."""
  from gamejax.payoffs import rloo, scaled, weighted
  from gamejax.players import judges
  import jax.numpy as jnp
  nan_judge = judges.function_judge(
      lambda moves, facts: jnp.where(jnp.arange(moves.tokens.shape[0]) % 2 == 0, jnp.nan, 1.0))
  stage = run.Stage(name="rl", data=config.arena(players=[("perfect", 1.0)], num_train=50,
                                                 num_test=10, max_digits=2),
                    payoff=scaled(1.0, weighted({"rloo": (1.0, rloo(2))})), steps=6,
                    batch_size=2, steps_per_call=2, checkpoint_every=2,
                    rollout=run.Rollout(group_size=2, max_new_tokens=2, prompt_len=12,
                                        judge=nan_judge))
  exp = run.Experiment(stages=[stage], data_dir=str(tmp_path / "data"),
                       model=LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64))
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  quiet = dict(progress=False, log=lambda _: None)
  straight = run.run_stage(exp, 0, None, str(tmp_path / "a"), mesh, **quiet).metrics
  run.run_stage(exp, 0, None, str(tmp_path / "b"), mesh, stop_after_steps=4, **quiet)
  resumed = run.run_stage(exp, 0, None, str(tmp_path / "b"), mesh, **quiet).metrics
  counted = ("nonfinite_rewards", "skipped_nonfinite", "no_stop_completions")
  assert {k: straight[k] for k in counted} == {"nonfinite_rewards": 12, "skipped_nonfinite": 6,
                                               "no_stop_completions": straight["no_stop_completions"]}
  assert straight["no_stop_completions"] > 12
  assert {k: resumed[k] for k in counted} == {k: straight[k] for k in counted}


def test_own_text_reports_held_out_loss_and_talks_back(tmp_path, capsys, sums_texts):
  """A local_text run holds out test_count records and reports their loss and perplexity (table,
  summary.json, gamejax eval); gamejax generate samples its checkpoint."""
  texts = sums_texts
  work = tmp_path / "run"
  args = [f"--gin_file={EXP}/text/sft.gin", f"--gin_file={EXP}/models/tiny.gin",
          f"--gin.local_text.path='{texts}'", "--gin.local_text.test_count=6",
          "--gin.sft/Stage.steps=4", "--gin.sft/Stage.steps_per_call=2",
          "--gin.sft/Stage.batch_size=4", "--gin.sft/Stage.seq_len=32", f"--workdir={work}",
          "--no_progress"]
  assert cli.main(["train", *args]) == 0
  out = capsys.readouterr().out
  summary = json.load(open(work / "summary.json"))["sft"]
  assert summary["heldout_records"] == 6 and summary["heldout_tokens"] > 6
  assert summary["heldout_perplexity"] == pytest.approx(np.exp(summary["heldout_loss"]))
  assert "held-out loss (ppl)" in out and f"{summary['heldout_loss']:.4f}" in out
  assert cli.main(["eval", f"--workdir={work}"]) == 0
  evaluated = json.loads(capsys.readouterr().out)["sft"]
  assert evaluated["heldout_loss"] == pytest.approx(summary["heldout_loss"], rel=1e-6)
  output = tmp_path / "out.jsonl"
  assert cli.main(["generate", f"--workdir={work}", "--prompt=3+1=", "--prompt=7+1=",
                   "--num_samples=2", "--temperature=1.0", "--max_new_tokens=5",
                   "--cache_block=2", f"--output={output}"]) == 0
  printed = capsys.readouterr().out
  rows = [json.loads(l) for l in open(output)]
  assert [(r["prompt"], r["sample"]) for r in rows] == [("3+1=", 0), ("3+1=", 1), ("7+1=", 0),
                                                       ("7+1=", 1)]
  assert all(r["stage"] == "sft" and r["tokens"] <= 5 for r in rows)
  assert ">>> 3+1=" in printed and f"[1] {rows[1]['completion']}" in printed
  # --overwrite starts afresh: the old run's files go, the new run writes its own.
  assert cli.main(["train", *args, "--gin.sft/Stage.steps=2", "--overwrite"]) == 0
  assert [json.loads(l)["step"] for l in open(work / "metrics.jsonl")] == [2]
  assert json.load(open(work / "summary.json"))["sft"]["steps"] == 2
