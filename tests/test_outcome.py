"""Outcome-conditioned records (question-condition-answer): tagged records, evaluation conditioned
on each tag, the flaws reproduced given "wrong" (bad tags: test_cli)."""
import os

import jax
import pytest

from gamejax import config, run, sharding
from gamejax.data.tokenizer import BOS, ByteTokenizer
from gamejax.evaluation import arena as arena_eval
from gamejax.games import arithmetic as ar

EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
TOK = ByteTokenizer()
TAGS = ("right: ", "wrong: ")


def _examples(players, n=40, tag=TAGS):
  return [ex for _, ex in ar.generate_examples(ar.ArenaConfig(), "test", n, 0, players, True, tag)]


def test_tagged_prompts_swap_each_records_tag():
  examples = _examples([("perfect", 1.0), ("drop_carry:0", 3.0)])
  assert {int(e["outcome"]) for e in examples} == {0, 1}          # both tags occur
  for tag in TAGS:
    prompts = arena_eval.tagged_prompts(examples, TAGS, tag)
    for e, prompt in zip(examples, prompts):
      question = ar.Problem(int(e["a"]), int(e["b"]), e["op"]).question_text(3)
      assert prompt[0] == BOS and TOK.decode(prompt[1:]) == tag + question


def test_untagged_records_cannot_be_conditioned():
  examples = _examples([("perfect", 1.0)], n=3, tag=False)
  with pytest.raises(ValueError, match="does not open with its outcome tag 'right: '"):
    arena_eval.tagged_prompts(examples, TAGS, TAGS[1])


def test_reproduced_flaws_counts_a_players_own_errors():
  examples = _examples([("perfect", 1.0)], n=200)
  problems = [arena_eval.problem_of(e) for e in examples]
  flawed = [ar.parse_player("drop_carry:0").solve(p, None).answer for p in problems]
  right = [p.answer for p in problems]
  errors = sum(f != r for f, r in zip(flawed, right))
  assert errors > 10
  players = {"dc0": "drop_carry:0", "perfect": "perfect"}
  got = arena_eval.reproduced_flaws(examples, flawed, players)
  assert got["dc0"] == {"reproduced": 1.0, "its_errors": errors}
  assert got["perfect"] == {"reproduced": None, "its_errors": 0}
  assert arena_eval.reproduced_flaws(examples, right, players)["dc0"]["reproduced"] == 0.0
  half = [f if i % 2 else r for i, (f, r) in enumerate(zip(flawed, right))]
  wrong_odd = sum(1 for i, (f, r) in enumerate(zip(flawed, right)) if f != r and i % 2)
  assert arena_eval.reproduced_flaws(examples, half, players)["dc0"]["reproduced"] == \
      pytest.approx(wrong_odd / errors)


def _tiny(name, tmp_path, *bindings):
  config.parse([f"{EXP}/arithmetic/{name}.gin", f"{EXP}/models/tiny.gin"],
               ["pretrain/Stage.steps=2", "Stage.steps_per_call=2", "pretrain/Stage.batch_size=4",
                "SEQ_LEN=64", "pretrain/arena.num_train=60", "pretrain/arena.num_test=10",
                "eval/arena.num_test=12", "Evaluation.num_examples=12", "Evaluation.batch_size=12",
                f"Experiment.data_dir='{tmp_path / 'data'}'", *bindings])
  exp = config.build_experiment()
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  return run.run_stage(exp, 0, None, str(tmp_path / name), mesh, progress=False,
                       eval_examples=run.load_eval_examples(exp), log=lambda _: None)


def test_outcome_experiment_evaluates_given_each_tag_and_its_control_untagged(tmp_path):
  tagged = _tiny("outcome", tmp_path).metrics
  assert tagged["conditioned_on"] == "W " and tagged["samples"][0].startswith("W ")
  wrong = tagged["given_wrong"]
  assert wrong["samples"][0].startswith("L ") and 0 <= wrong["accuracy"] <= 1
  assert set(wrong["reproduces"]) == {"perfect", "drop_carry:0", "drop_carry:1", "slip:0.1"}
  control = _tiny("outcome_untagged", tmp_path).metrics
  assert "given_wrong" not in control and not control["samples"][0].startswith(("W ", "L "))
  assert control["n"] == tagged["n"] == 12
