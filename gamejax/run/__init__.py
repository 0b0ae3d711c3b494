"""Running an experiment: a sequence of stages, each a game played by the one compiled step.

The package is split along its jobs:

- ``schema``: what an experiment is (``Experiment``, ``Stage``, ``Player``, ``Rollout``, ...) and
  the checks that it can run;
- ``registry``: learner models and judges by name;
- ``assembly``: a stage turned into the step's pieces (loader, ``Game``, initial ``GameState``);
- ``loop``: one stage played from its latest checkpoint, metrics read one call late;
- ``evaluation``: held-out figures of a stage's final players;
- ``pipeline``: the stages in order, resumed or reused from a run directory, and the results table.
"""
from gamejax.run.assembly import (initial_players, policies_of, stage_game, stage_loader,
                                  stage_state)
from gamejax.run.evaluation import (evaluate, evaluate_stage, export_policy, heldout,
                                    load_eval_examples, reference_accuracies, seated_players)
from gamejax.run.loop import (MetricsWriter, StageResult, Throughput, count_events, run_stage,
                              write_json_atomic)
from gamejax.run.pipeline import (describe_stages, prepare_data, restore_params, restore_players,
                                  run_experiment, stage_table)
from gamejax.run.schema import (AGENT, ANSWER_WIDTH, COUNTED, PAIR_SOURCES, DataSpec, Evaluation,
                                Experiment, ExperimentError, Optimizer, Player, Rollout, Spin,
                                Stage)

__all__ = [
    "AGENT", "ANSWER_WIDTH", "COUNTED", "DataSpec", "Evaluation", "Experiment", "ExperimentError",
    "MetricsWriter", "Optimizer", "PAIR_SOURCES", "Player", "Rollout", "Spin", "Stage", "StageResult",
    "Throughput", "count_events", "describe_stages", "evaluate", "evaluate_stage", "export_policy", "heldout",
    "initial_players", "load_eval_examples", "policies_of", "prepare_data", "reference_accuracies",
    "restore_params", "restore_players", "run_experiment", "run_stage", "seated_players", "stage_game",
    "stage_loader", "stage_state", "stage_table", "write_json_atomic",
]
