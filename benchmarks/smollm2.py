"""A real model, gamejax beside transformers on the same machine: sampling and LoRA training
tokens/s of an imported checkpoint (SmolLM2-135M-Instruct by default), printed as one JSON line.

* ``sample``: ``batch`` prompts of ``prompt_len`` tokens, ``new_tokens`` sampled at temperature 1
  per row (no early stop). gamejax: ``sampling.make_generate`` (prefill, then one KV-cached step per
  token, all in one compiled call); transformers: ``model.generate(do_sample=True,
  min_new_tokens=max_new_tokens)`` with its KV cache. tokens/s = ``batch * new_tokens / seconds``.
* ``train``: one LoRA update (rank 8 on every attention and MLP projection, AdamW) on ``batch`` x
  ``seq_len`` tokens of next-token loss. gamejax: the compiled game step (``imitation`` payoff,
  the forward reading the adapters unmerged on the frozen base, ``kernels.LowRank``); transformers:
  a PEFT LoRA model of the same targets, forward, backward and ``torch.optim.AdamW`` step.
  tokens/s = ``batch * seq_len / seconds``. ``gamejax_merged``: gamejax's step with
  ``LoraConfig.merged`` (the forward reads ``W + s A B`` formed, its backward forms each targeted
  weight's gradient), its calls alternating with the default's; ``train_low_rank_speedup``: its
  seconds over the default's.

Each figure is the median of ``--calls`` timed calls after warm-up (gamejax's first call
compiles). ``ratio`` = gamejax tokens/s / transformers tokens/s, both measured in this process.

    gamejax convert gguf:SmolLM2-135M-Instruct.Q4_1.gguf runs/smollm2-hf   # once
    python -m benchmarks.smollm2 --checkpoint=runs/smollm2-hf
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from gamejax import sampling, sharding, step as game_step
from gamejax.interop import hf
from gamejax.models import lm, lora
from gamejax.payoffs import imitation

TARGETS = "q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj"


def _gamejax(cfg, params, args, prompt_BP, tokens_BT):
  b, p = prompt_BP.shape
  gen = sampling.make_generate(cfg, args.new_tokens, temperature=1.0, eos_id=-1)
  lengths = np.full((b,), p, np.int32)
  key = jax.random.PRNGKey(0)
  sample = statistics.median(common.time_calls(
      lambda: jax.block_until_ready(gen(params, prompt_BP, lengths, key)), args.calls, warmup=1))

  b, t = tokens_BT.shape
  batch = {"tokens": tokens_BT[None], "positions": np.broadcast_to(np.arange(t, dtype=np.int32),
                                                                     (1, b, t)),
           "segment_ids": np.ones((1, b, t), np.int32),
           "players": np.full((1, b, t), 2, np.int32)}

  def train_step(merged: bool):
    """A blocking call of the LoRA step (``LoraConfig.merged``), compiled and warmed up."""
    lcfg = lora.LoraConfig(rank=8, alpha=16.0, targets=TARGETS, merged=merged)
    adapters = lora.init(cfg, lcfg, jax.random.PRNGKey(1), base="base")
    learner = game_step.Learner(functools.partial(lm.apply, cfg),
                                imitation(("agent", "opponent")), optax.adamw(1e-4))
    game = game_step.Game(learners={"agent": learner})
    # The step donates its state: each step gets its own copy of the base.
    state = game_step.init_state(game, {"agent": adapters}, jax.random.PRNGKey(2),
                                 frozen={"base": jax.tree.map(jnp.copy, params)})
    mesh = sharding.make_mesh(devices=jax.devices()[:1])
    step, shardings = game_step.make_step(game, mesh, jax.eval_shape(lambda: state))
    holder = [jax.device_put(state, shardings)]

    def one():
      holder[0], metrics = step(holder[0], batch)
      jax.block_until_ready(metrics)
    common.time_calls(one, 0, warmup=2)
    return one

  # The default (low-rank) and the merged step called in turn, so that both see the same load.
  steps = (train_step(merged=False), train_step(merged=True))
  times: tuple[list, list] = ([], [])
  for _ in range(args.calls):
    for fn, out in zip(steps, times):
      out += common.time_calls(fn, 1, warmup=0)
  return sample, statistics.median(times[0]), statistics.median(times[1])


def _transformers(path, args, prompt_BP, tokens_BT):
  import peft
  import torch
  import transformers
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  prompt = torch.tensor(prompt_BP, dtype=torch.long)

  def generate():
    with torch.no_grad():
      out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                           temperature=1.0, top_k=0, max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, pad_token_id=0)
    assert out.shape[1] == prompt.shape[1] + args.new_tokens

  sample = statistics.median(common.time_calls(generate, args.calls, warmup=1))
  tuned = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                     target_modules=TARGETS.split("|")))
  tuned.train()
  opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-4)
  ids = torch.tensor(tokens_BT, dtype=torch.long)

  def update():
    loss = tuned(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()

  train = statistics.median(common.time_calls(update, args.calls, warmup=1))
  return sample, train


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", default="runs/smollm2-hf", help="an HF directory")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--prompt_len", type=int, default=48)
  p.add_argument("--new_tokens", type=int, default=16)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--train_batch", type=int, default=4)
  p.add_argument("--calls", type=int, default=5)
  args = common.parse_args(p, argv)
  cfg, params = hf.load(args.checkpoint)
  rng = np.random.default_rng(0)
  prompt_BP = rng.integers(3, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
  tokens_BT = rng.integers(3, cfg.vocab_size, (args.train_batch, args.seq_len)).astype(np.int32)
  ours = _gamejax(cfg, params, args, prompt_BP, tokens_BT)
  del params
  theirs = _transformers(args.checkpoint, args, prompt_BP, tokens_BT)
  sampled, trained = args.batch * args.new_tokens, args.train_batch * args.seq_len
  out = {"benchmark": "smollm2", "checkpoint": args.checkpoint, "params": lm.param_count(cfg),
         **common.device_info(), "batch": args.batch,
         "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
         "train_batch": args.train_batch, "seq_len": args.seq_len,
         "sample_tokens_per_s": {"gamejax": sampled / ours[0], "transformers": sampled / theirs[0]},
         "train_tokens_per_s": {"gamejax": trained / ours[1], "gamejax_merged": trained / ours[2],
                                "transformers": trained / theirs[1]}}
  out["sample_ratio"] = out["sample_tokens_per_s"]["gamejax"] / out["sample_tokens_per_s"][
      "transformers"]
  out["train_ratio"] = out["train_tokens_per_s"]["gamejax"] / out["train_tokens_per_s"][
      "transformers"]
  out["train_low_rank_speedup"] = ours[2] / ours[1]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
