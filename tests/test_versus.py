"""Head-to-head play (Nash-MD's): the agent's and its opponent's answers to the same prompts
interleaved and attributed to their seats, the judge of pairs against the cyclic preference's
table, and the Nash-MD stage from gin (bad settings: test_cli)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from gamejax import config, records, run, step as game_step
from gamejax.data.tokenizer import ByteTokenizer
from gamejax.models import llama
from gamejax.players import judges, policy, selfplay, versus

EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
CFG = llama.LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
TOK = ByteTokenizer()


def test_versus_play_interleaves_the_seats_and_the_judge_scores_each_pair():
  keys = jax.random.split(jax.random.PRNGKey(0))
  params = {"agent": llama.init_params(CFG, keys[0])}
  frozen = {"reference": llama.init_params(CFG, keys[1])}
  state = game_step.GameState(params=params, opt_state={}, frozen=frozen, rng=None, step=None)
  sample = lambda **kw: policy.sampled_play(CFG, 3, 2, temperature=1.0, **kw)
  play = versus.versus_play(sample(), sample(player=selfplay.mixture("agent", "reference", 0.5)))
  prompts = [TOK.encode("12+34="), TOK.encode("5-1=")]
  prompt, lengths = policy.sampling.left_pad([np.concatenate([[1], p]) for p in prompts], 8)
  moves, facts = jax.jit(play)(state, {"prompt": prompt, "prompt_lengths": lengths},
                               jax.random.PRNGKey(2))
  assert moves.tokens.shape[0] == 12
  players = np.asarray(moves.players)
  real = np.asarray(moves.segment_ids) > 0
  mover = {0: records.AGENT, 1: records.OPPONENT}
  for row in range(12):
    who = players[row][real[row]]
    n_prompt = len(prompts[row // 6]) + 1
    assert (who[:n_prompt] == records.OPPONENT).all()
    assert (who[n_prompt:] == mover[row % 2]).all() and len(who) > n_prompt
  np.testing.assert_array_equal(np.asarray(facts["versus/is_opponent"]), [False, True] * 6)
  prefer = judges.cyclic_preference(strengths=(0.5, 0.3, 0.2))
  table = judges.cyclic_matrix((0.5, 0.3, 0.2))
  styles = {TOK.encode(c)[0]: i for i, c in enumerate("ABC")}
  # Answers chosen by hand: the judge reads each row's first answer token.
  first = np.asarray([TOK.encode(c)[0] for c in "ABBCxAAACCxx"])
  completion = np.asarray(facts["completion"]).copy()
  completion[:, 0] = first
  out = versus.versus_judge(prefer)(state, moves, {**facts, "completion": jnp.asarray(completion)},
                                    None)
  style = [styles.get(int(t), 3) for t in first]
  full = np.full((4, 4), 0.5)
  full[:3, :3], full[:3, 3], full[3, :3] = table, 1.0, 0.0
  want = np.repeat([full[style[2 * i], style[2 * i + 1]] for i in range(6)], 2)
  np.testing.assert_allclose(np.asarray(out["agent/rewards"]), want, rtol=1e-6)
  m = {k: float(v) for k, v in out["metrics"].items()}
  assert abs(m["judge/preference"] - want[::2].mean()) < 1e-6
  assert [round(m[f"style/p_{c}"] * 6) for c in "ABC"] == [2, 1, 1]    # the agent's rows: A B x A C x
  # Against every answer of the opponent's to the same prompt (3 per prompt, rows 6p..6p+5).
  out = versus.versus_judge(prefer, group_size=3)(
      state, moves, {**facts, "completion": jnp.asarray(completion)}, None)
  want = [np.mean([full[style[6 * p + 2 * g], style[6 * p + 2 * j + 1]] for j in range(3)])
          for p in range(2) for g in range(3)]
  np.testing.assert_allclose(np.asarray(out["agent/rewards"]), np.repeat(want, 2), rtol=1e-6)


def test_cyclic_nash_md_experiment_plays_from_gin(tmp_path):
  """The styles stage, then Nash-MD from it with it as the frozen reference."""
  config.parse([f"{EXP}/arithmetic/cyclic_nash_md.gin", f"{EXP}/models/tiny.gin"],
               ["sft/Stage.steps=2", "sft/Stage.batch_size=4", "sft/Stage.steps_per_call=2",
                "nash_md/Stage.steps=4", "nash_md/Stage.steps_per_call=2", "GROUP_SIZE=2",
                "nash_md/Stage.batch_size=2", "nash_md/arena.num_train=20",
                "nash_md/arena.num_test=5", "EMA_DECAY=0.0",
                f"Experiment.data_dir='{tmp_path / 'data'}'"])
  exp = config.build_experiment()
  work = str(tmp_path / "run")
  summary = run.run_experiment(exp, work, progress=False, log=lambda _: None)
  assert summary["nash_md"]["skipped_nonfinite"] == 0
  assert {"agent/probe/distance", "agent/ema_probe/p_A"} <= set(summary["nash_md"]["probes"])
  rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))
          if '"nash_md"' in line]
  assert {"style/distance", "judge/preference", "agent/pg/reward_mean", "agent/kl/kl",
          "versus/completion_length", "agent/probe/distance"} <= set(rows[0]), sorted(rows[0])
  final, frozen = run.restore_players(exp, 1, work)
  for e, f in zip(jax.tree.leaves(frozen["ema"]), jax.tree.leaves(final["agent"])):
    np.testing.assert_array_equal(e, f)          # the EMA (decay 0 here) kept after every step
  styles = run.restore_params(exp, 0, work)["agent"]
  for r, s in zip(jax.tree.leaves(frozen["reference"]), jax.tree.leaves(styles)):
    np.testing.assert_array_equal(r, s)
