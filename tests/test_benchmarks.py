"""benchmarks.against_commit: the earlier commit is unpacked whole, its benchmarks import its own
gamejax, and a commit that does not exist is a clear exit 2."""
import json
import os
import subprocess

import jax
import pytest

from benchmarks import against_commit


def test_an_unpacked_commit_imports_its_own_gamejax(tmp_path):
  full = against_commit.unpack("HEAD", str(tmp_path))
  head = subprocess.run(["git", "-C", against_commit.REPO, "rev-parse", "HEAD"],
                        capture_output=True, text=True, check=True).stdout.strip()
  assert full == head
  assert os.path.exists(tmp_path / "benchmarks" / "grpo_step.py")
  assert os.path.realpath(against_commit._imported_from(str(tmp_path))) == os.path.realpath(
      tmp_path)


def test_a_commit_that_does_not_exist_exits_2(capsys):
  assert against_commit.main(["--commit", "0123456789abcdef"]) == 2
  assert "cannot unpack commit '0123456789abcdef'" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    against_commit.main(["--cases", "grpo_a,nonsense"])


def test_the_bound_a_sampler_could_give_the_grpo_step():
  """``against_commit.sampling_bound``: the commit's step time over this tree's training half
  plus sampling at its FLOP floor (efficiency x seconds); none for the sampler's own benchmark."""
  from benchmarks import against_commit
  here = {"breakdown": {"sample_prefill": 0.01, "sample_decode": 0.09, "reference_forward": 0.04,
                        "policy_forward_backward": 0.15, "optimizer": 0.01, "host_and_rest": 0.02},
          "sample_seconds": 0.1, "sample_efficiency": 0.4}
  assert against_commit.sampling_bound(0.36, here) == pytest.approx(0.36 / (0.2 + 0.04))
  sampler_only = {"breakdown": {"prefill": 0.01, "decode": 0.05}}
  assert against_commit.sampling_bound(0.1, sampler_only) is None


def test_the_1b_model_file_is_llama_3_2_1b_and_its_path_trains(capsys, monkeypatch):
  """experiments/models/1b.gin: Llama 3.2 1B's sizes (1,235,814,400 parameters, the plan of
  docs/scaling.md), bf16 compute, library attention; a narrow slice of it (same settings, the
  size flags on top) runs the benchmark's compiled step."""
  from benchmarks import common, train_step
  from gamejax import scaling
  from gamejax.models import llama
  cfg = llama.LlamaConfig(**common.model_bindings("models/1b.gin"))
  assert llama.param_count(cfg) == 1_235_814_400
  assert (cfg.dtype, cfg.attention, cfg.rope_theta) == ("bfloat16", "dot_product_attention", 5e5)
  assert llama.param_count(scaling.LLAMA_1B) == llama.param_count(cfg)
  # (the peaks are not measured here: a bf16 setting's MFU must take the bf16 one)
  monkeypatch.setattr(common, "matmul_peak_flops",
                      lambda dtype=None: 2e11 if dtype == jax.numpy.bfloat16 else 1e11)
  train_step.main(["--model=models/1b.gin", "--vocab_size=256", "--d_model=64", "--d_ff=128",
                   "--n_layers=1", "--n_heads=4", "--n_kv_heads=2", "--seq_len=16", "--batch=2",
                   "--steps=1", "--settings=bf16"])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  bf16 = out["settings"]["bf16"]
  assert bf16["tokens_per_s"] > 0 and out["params"] < 1e6
  from gamejax.run import reproduce        # where it ran, the host CPU named
  assert out["device"] == jax.devices()[0].device_kind
  assert out["host_cpu"] == reproduce.host_cpu() and out["host_cpu"]["model"]
  assert bf16["matmul_peak_flops_per_s"] == 2e11
  assert bf16["mfu"] == pytest.approx(bf16["model_flops_per_s"] / 2e11)


def test_device_run_reports_a_case_that_runs_out_of_its_time(capsys):
  """benchmarks.device_run gives each case a share of the budget; one that runs past it is
  reported (and the run exits 1) rather than eating the GPU's few minutes."""
  from benchmarks import device_run
  assert device_run.main(["--smoke", "--cases=sample_b64", "--budget_s=0.5"]) == 1
  lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert "past its 0 s share" in lines[0]["error"] and lines[-1]["failed"] == ["sample_b64"]
  smoke = device_run.case_args("sample", device_run.CASES["sample_b64"][1], smoke=True)
  assert "--model=models/1b.gin" in smoke and "--no_baseline" in smoke and "--batch=4" in smoke


def test_the_share_prompt_benchmark_runs_both_steps_and_counts_fewer_flops(capsys, monkeypatch):
  """benchmarks.share_prompt on a toy model: both steps timed, and XLA counts fewer FLOPs in the
  step that computes each group's prompt once (a long prompt, a group of 16)."""
  from benchmarks import share_prompt
  monkeypatch.setitem(share_prompt.CASES, "long_group", (1, 4, 12, 4))
  share_prompt.main(["--cases=long_group", "--calls=1", "--vocab_size=64", "--d_model=32",
                     "--d_ff=64", "--n_layers=1", "--n_heads=2", "--n_kv_heads=1"])
  case = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["cases"]["long_group"]
  assert case["full_seconds"] > 0 and case["shared_seconds"] > 0
  assert case["speedup"] == pytest.approx(case["full_seconds"] / case["shared_seconds"])
  assert case["shared_flops"] < 0.9 * case["full_flops"]


def test_the_memory_benchmark_compiles_the_grpo_step_with_the_logits_whole_and_in_blocks(capsys):
  """benchmarks.memory on a toy model at a vocabulary of 4,096: XLA's analysis of the compiled
  GRPO step, whose temporaries fall by more than half when the payoffs read blocks of 8; and
  train_step's ``chunkC`` setting names ``logits_chunk``."""
  from benchmarks import memory, train_step
  memory.main(["--model=models/bench_sampling.gin", "--vocab_size=4096", "--d_model=32",
               "--d_ff=64", "--n_layers=1", "--n_heads=2", "--n_kv_heads=1", "--prompts=2",
               "--group_size=2", "--prompt_len=8", "--new_tokens=24", "--accumulate=1",
               "--remat=none", "--logits_chunks=0,8"])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  whole, blocks = out["logits_chunk"]["0"], out["logits_chunk"]["8"]
  assert out["logits_gb"] == pytest.approx(4 * 32 * 4096 * 4 / 1e9)
  assert whole["temporaries"] > 2 * out["logits_gb"]
  assert blocks["temporaries"] < whole["temporaries"] / 2
  assert blocks["peak"] == pytest.approx(
      blocks["arguments"] + blocks["outputs"] + blocks["temporaries"] - blocks["aliased"])
  assert train_step.parse_setting("chunk32+accum2") == {
      "remat": "none", "dtype": "float32", "accumulate": 2, "logits_chunk": 32}


def test_the_sample_benchmark_decodes_in_the_runs_it_is_given(capsys, monkeypatch):
  """benchmarks.sample on a toy model with ``--cache_block=2``: the sampler it times gets the
  block, and its JSON says 6 decode steps in 3 runs; a negative block is refused."""
  from benchmarks import sample
  from gamejax import sampling
  blocks, make_generate = [], sampling.make_generate
  monkeypatch.setattr(sampling, "make_generate", lambda *a, **k: blocks.append(
      k.get("cache_block", sampling.DECODE_CACHE_BLOCK)) or make_generate(*a, **k))
  toy = ["--vocab_size=64", "--d_model=32", "--d_ff=64", "--n_layers=1", "--n_heads=2",
         "--n_kv_heads=1", "--batch=2", "--prompt_len=4", "--new_tokens=7", "--calls=5",
         "--no_baseline", "--no_hugepages"]
  sample.main([*toy, "--cache_block=2"])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (out["cache_block"], out["decode_runs"]) == (2, 3) and out["seconds_per_call"] > 0
  assert blocks[0] == 2       # the timed sampler (the others: one-token prefill, kernel count)
  with pytest.raises(SystemExit):
    sample.main([*toy, "--cache_block=-1"])
  assert "--cache_block must be >= 0" in capsys.readouterr().err
