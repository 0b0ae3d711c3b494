"""The command line on bad input: clear errors naming file, line and name; exit 2; no workdir."""
import os

import pytest

from gamejax import cli

EXP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
PIPELINE = os.path.join(EXP, "arithmetic", "pipeline.gin")


def _write(tmp_path, text, name="exp.gin"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _train(args, capsys):
  code = cli.main(["train", *args])
  return code, capsys.readouterr().err


def test_syntax_error_names_file_and_line(tmp_path, capsys):
  bad = _write(tmp_path, f"include '{PIPELINE}'\nStage.steps = = 3\n")
  work = tmp_path / "run"
  code, err = _train([f"--gin_file={bad}", f"--workdir={work}"], capsys)
  assert code == 2
  assert f"{bad}:2" in err and "syntax" in err.lower()
  assert not work.exists()


def test_unclosed_bracket_names_file(tmp_path, capsys):
  bad = _write(tmp_path, "Stage.steps = (3\n")
  code, err = _train([f"--gin_file={bad}", f"--workdir={tmp_path / 'run'}"], capsys)
  assert code == 2 and bad in err and "syntax" in err.lower()
  assert not (tmp_path / "run").exists()


def test_unknown_configurable_suggests_close_match(tmp_path, capsys):
  bad = _write(tmp_path, f"include '{PIPELINE}'\n\nStagee.steps = 3\n")
  code, err = _train([f"--gin_file={bad}", f"--workdir={tmp_path / 'run'}"], capsys)
  assert code == 2
  assert f"{bad}:3" in err and "'Stagee'" in err and "Did you mean: Stage" in err
  assert not (tmp_path / "run").exists()


def test_unknown_parameter_suggests_close_match(tmp_path, capsys):
  bad = _write(tmp_path, f"include '{PIPELINE}'\nsft/Stage.stepz = 3\n")
  code, err = _train([f"--gin_file={bad}", f"--workdir={tmp_path / 'run'}"], capsys)
  assert code == 2
  assert f"{bad}:2" in err and "'stepz'" in err and "steps" in err
  assert not (tmp_path / "run").exists()


def test_unknown_name_in_flag_binding(tmp_path, capsys):
  code, err = _train([f"--gin_file={PIPELINE}", "--gin.LlamaConfig.d_modle=64",
                      f"--workdir={tmp_path / 'run'}"], capsys)
  assert code == 2 and "d_modle" in err and "d_model" in err and "--gin." in err
  assert not (tmp_path / "run").exists()


def test_missing_required_value(tmp_path, capsys):
  bad = _write(tmp_path, f"include '{EXP}/regimes/sft.gin'\ninclude '{EXP}/arithmetic/arena.gin'\n"
                         "Experiment.stages = [@sft/Stage()]\nsft/Stage.steps = 10\n")
  code, err = _train([f"--gin_file={bad}", f"--workdir={tmp_path / 'run'}"], capsys)
  assert code == 2 and "data" in err and "REQUIRED" in err
  assert not (tmp_path / "run").exists()


def test_unknown_dataset(tmp_path, capsys):
  code, err = _train([f"--gin_file={PIPELINE}", "--gin.sft/Stage.data=@DataSpec()",
                      "--gin.DataSpec.name='arithmetic_arenna'", f"--workdir={tmp_path / 'run'}"],
                     capsys)
  assert code == 2 and "arithmetic_arenna" in err and "arithmetic_arena" in err
  assert not (tmp_path / "run").exists()


def test_data_folder_without_records(tmp_path, capsys):
  folder = tmp_path / "texts"
  folder.mkdir()
  (folder / "empty.txt").write_text("")
  # (A small pre-training set: prepare_data builds it before it reaches the sft stage's folder.)
  code, err = _train([f"--gin_file={PIPELINE}", "--gin.sft/Stage.data=@local_text()",
                      f"--gin.local_text.path='{folder}'", f"--gin.Experiment.data_dir='{tmp_path}/d'",
                      "--gin.pretrain/arena.num_train=20", f"--workdir={tmp_path / 'run'}"], capsys)
  assert code == 2 and str(folder) in err and "no usable records" in err
  assert not (tmp_path / "run").exists()


def test_workdir_with_another_run_is_refused(tmp_path, capsys):
  work = tmp_path / "run"
  work.mkdir()
  (work / "config.gin").write_text("# another run\n")
  code, err = _train([f"--gin_file={PIPELINE}", f"--workdir={work}"], capsys)
  assert code == 2 and "--resume" in err and "--overwrite" in err
  assert (work / "config.gin").read_text() == "# another run\n"


def test_eval_without_run(tmp_path, capsys):
  assert cli.main(["eval", f"--workdir={tmp_path}"]) == 2
  assert "config.gin" in capsys.readouterr().err


@pytest.mark.parametrize("binding, message", [
    ("grpo/Rollout.group_size=4", "the payoff groups 8 completions per prompt but "
                                  "Rollout.group_size=4"),
    ("grpo/Rollout.judge='judge_me'", "Rollout.judge='judge_me'; expected one of ['arena', "),
    ("grpo_rm/Rollout.judge_from='sft'", "needs judge_from naming an earlier reward_model stage"),
    ("grpo/Rollout.turns=2", "Rollout.turns=2 needs an opponent"),
    ("grpo/Rollout.cache_block=-1", "Rollout.cache_block must be an int >= 0 (0: the decode "
                                    "loop in one run); got -1"),
    ("grpo/Stage.player='critic'", "player='critic'; expected one of"),
    ("grpo/Stage.init_from='grpo_rm'", "init_from='grpo_rm'; expected 'previous', None, an "
                                       "earlier stage's name"),
    ("grpo/Stage.init_from='hf:/no/such/dir'", "init_from='hf:/no/such/dir': /no/such/dir: no "
                                               "config.json"),
    ("reward_model/Stage.batch_size=31", "batch_size=31 must be even for preference pairs"),
    ("grpo/Stage.minibatches=2", "minibatches=2 would split the groups of 8 completions"),
])
def test_bad_game_settings_are_config_errors(tmp_path, capsys, binding, message):
  work = tmp_path / "run"
  code, err = _train([f"--gin_file={PIPELINE}", f"--gin.{binding}", f"--workdir={work}"], capsys)
  assert code == 2 and message in err, err
  assert not work.exists()


@pytest.mark.parametrize("experiment, binding, message", [
    ("outcome", "pretrain/arena.outcome_tag=('W', 'W!')",
     "arena.outcome_tag: outcome tags ('W', 'W!'): 'W' is a prefix of 'W!'"),
    ("outcome", "eval/arena.outcome_tag=('gut ', 'schlecht\u00e9')", "printable ASCII"),
    ("outcome", "pretrain/arena.outcome_tag='W '", "expected True, False or a pair"),
    ("spin", "spin/Spin.iterations=0", "Spin.iterations=0; SPIN needs at least 1 iteration"),
    ("spin", "spin/Spin.iterations=7", "steps=300 do not split into Spin.iterations=7"),
    ("spin", "spin/Stage.reference=True", "brings its own reference"),
    ("spin", "spin/Stage.eval_every=15",
     "eval_every=15 must be a positive multiple of steps_per_call=10"),
    ("sppo", "sppo/sppo.eta=0.0", "sppo: eta must be > 0"),
    ("reward_model", "reward_model/Stage.eval_every=10", "eval_every=10 evaluates a policy"),
    ("cyclic_sppo", "cyclic_preference.strengths=(0.5, 0.7, 0.2)",
     "cyclic_preference.strengths=(0.5, 0.7, 0.2): expected 3 strengths in (0, 1/2]"),
    ("cyclic_sppo", "sppo/Stage.reference=True", "instead of reference=True"),
    ("sppo", "sppo/pairwise_judge.group_size=1", "pairwise_judge needs group_size >= 2"),
    ("redteam", "redteam_game.max_digits=2",
     "the attacker writes 2-digit zero-padded problems with ops ('+', '-')"),
    ("redteam", "arena.pad=False", "has max_digits=3, pad=False"),
    ("redteam", "redteam_game.max_digits=10", "redteam_game.max_digits=10: the attacker's"),
    ("redteam", "redteam_game.ops=['*']", "redteam_game.ops=('*',): expected a non-empty subset"),
    ("redteam", "redteam/Stage.frozen_from={'control': 'nope'}",
     "frozen_from['control']='nope'; expected an earlier stage's name"),
    ("redteam", "redteam_game.defenders={'initial': 'ghost'}",
     "the game reads the frozen player 'ghost'"),
    ("redteam", "defender/grpo.group_size=4", "the game plays groups of 8"),
    ("cyclic_nash_md", "nash_md/Stage.reference=False",
     "needs Stage.reference=True"),
    ("cyclic_nash_md", "nash_md/Rollout.versus=None",
     "it compares the agent with an opponent: set Rollout.versus"),
    ("cyclic_nash_md", "nash_md/versus_judge.group_size=3",
     "versus_judge.group_size=3 compares each answer with that many"),
    ("cyclic_sppo", "first_move_probe.moves=('A', 'BB')", "each move must be one token"),
    ("cyclic_sppo", "ema.learner='bob'", "copies of the agent its payoffs read"),
    ("cyclic_grpo", "grpo/Stage.followers={}", "reads the frozen player 'ema'"),
    ("redteam", "after/Stage.name='after'\nafter/Stage.payoff=@sft/imitation()\n"
     "after/Stage.data=@sft/arena()\nafter/Stage.init_from='redteam'\nafter/Stage.steps=10\n"
     "Experiment.stages="
     "[@pretrain/Stage(), @sft/Stage(), @grpo/Stage(), @redteam/Stage(), @after/Stage()]",
     "starts from stage 'redteam', which has learners ['attacker', 'defender'] and none named "
     "'agent'; name one (init_from='redteam:PLAYER')"),
])
def test_bad_regime_settings_are_config_errors(tmp_path, capsys, experiment, binding, message):
  work = tmp_path / "run"
  code, err = _train([f"--gin_file={EXP}/arithmetic/{experiment}.gin", f"--gin.{binding}",
                      f"--workdir={work}"], capsys)
  assert code == 2 and message in err, err
  assert not work.exists()


def test_unquoted_string_value_shows_the_quoting_that_works(tmp_path, capsys):
  code, err = _train([f"--gin_file={EXP}/text/sft.gin", "--gin.local_text.path=/path/to/folder",
                      f"--workdir={tmp_path / 'run'}"], capsys)
  assert code == 2 and "--gin.local_text.path=\"'/path/to/folder'\"" in err
  code, err = _train([f"--gin_file={PIPELINE}", "--gin.sft/arena.players=[(perfect, 1.0)]",
                      f"--workdir={tmp_path / 'run'}"], capsys)
  assert code == 2 and "--gin.sft/arena.players=\"[('perfect', 1.0)]\"" in err
  assert not (tmp_path / "run").exists()


def test_dry_run_prints_config_and_stages_and_creates_nothing(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("GAMEJAX_DATA_DIR", str(tmp_path / "data"))
  work = tmp_path / "run"
  code = cli.main(["train", f"--gin_file={PIPELINE}", "--gin.grpo/Rollout.temperature=1.5",
                   f"--workdir={work}", "--dry_run"])
  out = capsys.readouterr().out
  assert code == 0
  assert "grpo/Rollout.temperature = 1.5" in out          # the operative config
  for i, name in enumerate(("pretrain", "sft", "sft_continued", "reward_model", "grpo",
                            "grpo_rm")):
    assert f"{i + 1}. {name}:" in out
  assert "temperature 1.5 (scored at 1.5)" in out and "nothing created" in out
  assert not work.exists() and not (tmp_path / "data").exists()
  # It validates as a run would: a bad setting, or a workdir in the way, is refused the same way.
  code, err = _train([f"--gin_file={PIPELINE}", "--gin.grpo/Rollout.group_size=4",
                      f"--workdir={work}", "--dry_run"], capsys)
  assert code == 2 and "Rollout.group_size=4" in err
  work.mkdir()
  (work / "config.gin").write_text("# another run\n")
  code, err = _train([f"--gin_file={PIPELINE}", f"--workdir={work}", "--dry_run"], capsys)
  assert code == 2 and "--resume" in err
  assert sorted(os.listdir(work)) == ["config.gin"]


def test_generate_without_checkpoints_names_what_exists(tmp_path, capsys):
  work = tmp_path / "run"
  work.mkdir()
  assert cli.main(["generate", f"--workdir={work}", "--prompt=1+2="]) == 2
  assert "no config.gin" in capsys.readouterr().err
  from gamejax import config
  config.parse([PIPELINE], [])
  config.build_experiment()
  (work / "config.gin").write_text(config.operative_config())
  assert cli.main(["generate", f"--workdir={work}", "--prompt=1+2="]) == 2
  err = capsys.readouterr().err
  assert "no checkpoint of any policy stage" in err and "holds no checkpoint" in err
  assert cli.main(["generate", f"--workdir={work}", "--stage=reward_model", "--prompt=1="]) == 2
  err = capsys.readouterr().err
  assert "not a policy" in err and "'grpo_rm'" in err
  assert cli.main(["generate", f"--workdir={work}", "--stage=grpo", "--prompt=1="]) == 2
  assert "has no checkpoint" in capsys.readouterr().err
  bad = tmp_path / "prompts.jsonl"
  bad.write_text('{"prompt": "1+2="}\n{"text": 3}\n')
  assert cli.main(["generate", f"--workdir={work}", f"--prompts={bad}"]) == 2
  assert f"{bad}:2" in capsys.readouterr().err
  assert cli.main(["generate", f"--workdir={work}", "--prompt=1+2=", "--cache_block=-1"]) == 2
  assert "--cache_block=-1 is out of range" in capsys.readouterr().err
