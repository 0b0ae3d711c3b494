"""The scaling calculator (``gamejax.scaling``): its per-device bytes against real arrays sharded
on 8 simulated devices, its FLOPs against gamejax's own counts and the published parameter counts,
its mesh search, and ``docs/scaling.md`` against what ``python -m benchmarks.scaling --markdown``
prints."""
import dataclasses
import json
import os

import pytest

from benchmarks import scaling as cli
from gamejax import scaling
from gamejax.models import lm
from gamejax.models.llama import LlamaConfig

from eight_devices import run_script

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "scaling.md")
BEGIN, END = "<!-- begin: python -m benchmarks.scaling --markdown -->", "<!-- end -->"

# Untied (an LM head), GQA with 1 kv head: wq | wk | wv stored fused as 4 + 2 = 6 heads, split over
# tensor = 2, replicated on the (1, 2, 4) mesh (6 does not divide by 4).
TINY = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=64,
                   tie_embeddings=False)
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4))

# Real params and AdamW state placed on each mesh as the game step places them; the bytes each
# device holds, the most any device holds.
SCRIPT = """
import json, sys, jax
from gamejax import sharding
from gamejax.models import lm
from gamejax.models.llama import LlamaConfig
from gamejax.run import schema
cfg = LlamaConfig(**json.loads(sys.argv[1]))
out = {}
for mesh_shape in json.loads(sys.argv[2]):
  mesh = sharding.make_mesh(*mesh_shape)
  params = lm.init_params(cfg, jax.random.key(0))
  opt = schema.Optimizer().build(total_steps=100).init(params)
  params = jax.device_put(params, sharding.state_shardings(mesh, params))
  opt = jax.device_put(opt, sharding.state_shardings(mesh, opt, params))
  def held(tree):
    per = {}
    for x in jax.tree.leaves(tree):
      for s in x.addressable_shards:
        per[s.device.id] = per.get(s.device.id, 0) + s.data.nbytes
    return max(per.values())
  out[str(tuple(mesh_shape))] = {"params": held(params), "opt_state": held(opt)}
print("BYTES", json.dumps(out))
"""


def test_per_device_bytes_equal_real_sharded_arrays_on_eight_devices():
  fields = {k: getattr(TINY, k) for k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                           "n_kv_heads", "d_ff", "tie_embeddings")}
  proc = run_script(SCRIPT, json.dumps(fields), json.dumps(MESHES), timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  real = json.loads(proc.stdout.split("BYTES", 1)[1])
  for mesh in MESHES:
    got = scaling.state_bytes(TINY, dict(zip(("data", "fsdp", "tensor"), mesh)))
    assert (got["params"], got["opt_state"]) == (real[str(mesh)]["params"],
                                                 real[str(mesh)]["opt_state"]), mesh
  # Sharding does shrink them: the check above is not of replicated arrays only.
  assert real[str((8, 1, 1))]["params"] == 4 * lm.param_count(TINY)
  assert all(real[str(m)]["params"] < 4 * lm.param_count(TINY) / 3 for m in MESHES[1:])


def test_counts_are_gamejax_counts_and_the_published_sizes():
  # Llama 3.2 1B and Llama 3.1 8B as published (their safetensors' parameter counts).
  assert lm.param_count(scaling.LLAMA_1B) == 1_235_814_400
  assert lm.param_count(scaling.LLAMA_8B) == 8_030_261_248
  dots = dataclasses.replace(scaling.LLAMA_8B, remat="dots")
  plan = scaling.Plan(dots, batch=256, seq_len=4096, mesh=(1, 64, 4))
  report = scaling.report(plan, scaling.TPU_V5E_256)
  assert report["flops_per_token"] == lm.flops_per_token(scaling.LLAMA_8B, 4096)
  assert report["model_flops_per_step"] == lm.flops_per_token(scaling.LLAMA_8B, 4096) * 256 * 4096
  assert report["executed_flops_per_token"] > report["flops_per_token"]  # dots recomputes
  full = scaling.executed_flops(dataclasses.replace(TINY, remat="full"), 16)
  assert full == pytest.approx(4 / 3 * lm.flops_per_token(TINY, 16))
  # One chip's compute time at the assumed efficiency, by hand.
  t = scaling.step_time(plan, scaling.TPU_V5E_256)
  by_hand = report["executed_flops_per_token"] * 256 * 4096 / (256 * 197e12 * 0.4)
  assert t["compute"] == pytest.approx(by_hand)


def test_search_picks_a_plan_that_fits_and_is_the_fastest_that_does():
  hw = scaling.TPU_V5E_256
  ranked = scaling.ranked(scaling.LLAMA_8B, 256, 4096, hw)
  best = ranked[0]
  assert scaling.memory(best)["total"] <= scaling.USABLE_MEMORY * hw.memory_bytes
  steps = [scaling.step_time(p, hw)["step"] for p in ranked]
  assert steps[0] == min(steps)
  # 16 bytes of float32 params, gradients and moments per parameter: 128 GB cannot be replicated
  # on 16 GB chips, so plain data parallelism is no candidate that fits.
  assert all(p.mesh[1] * p.mesh[2] > 1 for p in ranked)
  tiny_memory = scaling.Hardware("tiny", 8, 1e12, 1e4, 1e11, 1e10)
  assert scaling.best_plan(TINY, 8, 16, tiny_memory) is None


def test_the_doc_tables_are_what_the_cli_prints(capsys):
  cli.main(["--markdown"])
  printed = capsys.readouterr().out
  with open(DOC) as f:
    doc = f.read()
  assert BEGIN in doc and END in doc.split(BEGIN, 1)[1], f"{DOC}: no generated section"
  generated = doc.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n") + "\n"
  assert generated == printed, ("docs/scaling.md is out of date: paste the output of "
                                "`python -m benchmarks.scaling --markdown` between its markers")
