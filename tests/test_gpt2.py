"""The GPT-2 family (``gamejax.models.gpt2``) checked against transformers' ``GPT2LMHeadModel``: a
random model saved by ``save_pretrained`` is read by ``gamejax.interop.hf`` and gives the same
logits on a 512-token prompt (so the position embedding is read far out), the same greedy tokens
and the same parameter gradients (the training path's custom backward); a packed row gives each
segment transformers' logits for it alone; the KV-cached path gives the full forward's logits;
gamejax's export is bitwise and transformers reads it; configs it cannot run fail naming the key.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gamejax import sampling
from gamejax.interop import hf
from gamejax.models import families, gpt2, lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, PROMPT_LEN, NEW = 96, 512, 32


def _hf_dir(tmp_path, activation="gelu_new", seed=0):
  """A random ``GPT2LMHeadModel`` saved by transformers, and the model. LayerNorm scales away
  from 1 and every bias away from 0, so a swapped or dropped one changes the logits; weights 10x
  GPT-2's init, so that greedy decoding does not settle on one token (at 0.02 it repeats one)."""
  torch.manual_seed(seed)
  config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                   n_positions=1024, activation_function=activation,
                                   initializer_range=0.2, bos_token_id=None, eos_token_id=None)
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".ln_" in name and name.endswith(".weight"):
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.3 * torch.randn_like(p))
  path = str(tmp_path / f"gpt2_{activation}")
  model.save_pretrained(path)
  return path, model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(input_ids=torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


def _ours_logits(cfg, params, tokens, positions=None, segments=None):
  tokens = np.asarray(tokens, np.int32)
  if positions is None:
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  if segments is None:
    segments = np.ones_like(tokens)
  return np.asarray(jax.jit(lambda p, *a: lm.apply(cfg, p, *a))(params, tokens, positions,
                                                                    segments))


def test_the_family_is_found_and_counts_gpt2_small():
  assert families.FAMILIES()["gpt2"] is gpt2
  assert families.for_hf_architecture("GPT2LMHeadModel") is gpt2
  small = gpt2.GPT2Config(vocab_size=50257, d_model=768, n_layers=12, n_heads=12)
  assert lm.param_count(small) == 124_439_808            # GPT-2 small, as published
  assert small.d_ff == 3072 and small.tie_embeddings


@pytest.mark.parametrize("activation", ["gelu_new", "gelu"])
def test_import_matches_transformers_logits_and_greedy_tokens(tmp_path, activation):
  path, model = _hf_dir(tmp_path, activation)
  assert "lm_head.weight" not in _tensors(path)          # tied: save_pretrained leaves it out
  cfg, params = hf.load(path)
  assert type(cfg) is gpt2.GPT2Config and cfg.activation == activation
  tokens = np.random.default_rng(1).integers(0, VOCAB, (2, PROMPT_LEN)).astype(np.int32)
  np.testing.assert_allclose(_ours_logits(cfg, params, tokens), _hf_logits(model, tokens),
                             atol=1e-4, rtol=1e-4)
  prompt = tokens[:1, :PROMPT_LEN - 8]
  with torch.no_grad():
    want = model.generate(torch.tensor(prompt, dtype=torch.long), max_new_tokens=NEW,
                          do_sample=False, eos_token_id=None, pad_token_id=0,
                          attention_mask=torch.ones_like(torch.tensor(prompt)))[0, prompt.shape[1]:]
  got = sampling.make_generate(cfg, NEW, temperature=0.0, eos_id=-1)(
      params, prompt, np.array([prompt.shape[1]], np.int32), jax.random.key(0))["tokens"][0]
  np.testing.assert_array_equal(np.asarray(got), want.numpy())
  assert len(set(want.tolist())) > 5                      # a continuation, not one token repeated


def test_a_packed_row_gives_each_segment_its_logits_alone(tmp_path):
  """Row 0 packs a 300-token and a 200-token transcript (positions restart at 0) and 12 pads; each
  segment gets transformers' logits for it alone. Row 1 is one transcript, as a control."""
  path, model = _hf_dir(tmp_path)
  cfg, params = hf.load(path)
  rng = np.random.default_rng(3)
  a, b = rng.integers(0, VOCAB, 300), rng.integers(0, VOCAB, 200)
  tokens = np.stack([np.concatenate([a, b, np.zeros(12, int)]),
                     rng.integers(0, VOCAB, PROMPT_LEN)]).astype(np.int32)
  positions = np.stack([np.concatenate([np.arange(300), np.arange(200), np.zeros(12, int)]),
                        np.arange(PROMPT_LEN)]).astype(np.int32)
  segments = np.stack([np.repeat([1, 2, 0], [300, 200, 12]), np.ones(PROMPT_LEN, int)]).astype(
      np.int32)
  got = _ours_logits(cfg, params, tokens, positions, segments)
  tol = dict(atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(got[0, :300], _hf_logits(model, a[None])[0], **tol)
  np.testing.assert_allclose(got[0, 300:500], _hf_logits(model, b[None])[0], **tol)
  np.testing.assert_allclose(got[1], _hf_logits(model, tokens[1:])[0], **tol)
  assert np.all(np.isfinite(got[0, 500:]))                # padding attends itself: no NaN


def test_cached_prefill_and_decode_equal_the_full_forward(tmp_path):
  """Left-padded prompts of two lengths, prefill then one-token steps through
  ``lm.apply_with_cache``, against ``lm.apply`` on the whole rows (padding as segment 0)."""
  path, _ = _hf_dir(tmp_path, "gelu")
  cfg, params = hf.load(path)
  p, steps = 24, 8
  rng = np.random.default_rng(4)
  tokens = rng.integers(1, VOCAB, (2, p + steps)).astype(np.int32)
  lengths = np.array([p, 15])
  real = np.arange(p + steps)[None] >= (p - lengths)[:, None]
  tokens = np.where(real, tokens, 0).astype(np.int32)
  positions = np.where(real, np.arange(p + steps)[None] - (p - lengths)[:, None], 0).astype(
      np.int32)
  segments = real.astype(np.int32)
  want = _ours_logits(cfg, params, tokens, positions, segments)

  @jax.jit
  def cached(params):
    cache = lm.init_cache(cfg, 2, p + steps)
    logits, cache = lm.apply_with_cache(cfg, params, tokens[:, :p], positions[:, :p],
                                        segments[:, :p], cache, 0)

    def step(cache, x):
      token_B, position_B, segment_B, slot = x
      logits_B1V, cache = lm.apply_with_cache(cfg, params, token_B[:, None], position_B[:, None],
                                              segment_B[:, None], cache, slot)
      return cache, logits_B1V[:, 0]

    cache, decoded_NBV = jax.lax.scan(step, cache, (tokens[:, p:].T, positions[:, p:].T,
                                                    segments[:, p:].T, np.arange(p, p + steps)))
    return jnp.concatenate([logits, decoded_NBV.transpose(1, 0, 2)], axis=1), cache

  got, cache = cached(params)
  assert cache["layers"][1]["k"].shape == (2, 4, 16, p + steps)   # keys transposed
  assert cache["layers"][1]["v"].shape == (2, 4, p + steps, 16)
  np.testing.assert_array_equal(np.asarray(cache["segment_ids"]), segments)
  np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-5, rtol=1e-5)


def test_gradients_match_torch_autograd(tmp_path):
  """The training path (``kernels.self_attention``'s written-out backward, given the identity
  rotation) gives torch's gradients of the same loss, for every parameter in HF's names (the tied
  embedding's includes the LM head's share)."""
  path, model = _hf_dir(tmp_path, seed=5)
  cfg, params = hf.load(path)
  tokens = np.random.default_rng(5).integers(0, VOCAB, (2, 100)).astype(np.int32)  # 2 blocks of 64

  def loss(params):
    positions = np.broadcast_to(np.arange(100, dtype=np.int32), tokens.shape)
    logits = lm.apply(cfg, params, tokens[:, :-1], positions[:, :-1], np.ones_like(tokens[:, :-1]))
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  grads = jax.jit(jax.grad(loss))(params)
  model.zero_grad()
  logits = model(input_ids=torch.tensor(tokens[:, :-1], dtype=torch.long)).logits
  torch_loss = -torch.log_softmax(logits, -1).gather(
      -1, torch.tensor(tokens[:, 1:, None], dtype=torch.long)).sum()
  torch_loss.backward()
  torch_grads = dict(model.named_parameters())
  for name, got in hf.hf_arrays(cfg, grads).items():
    want = torch_grads[name].grad.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=1e-3,
                               err_msg=name)


def _tensors(directory):
  from safetensors.numpy import load_file
  out = {}
  for file in sorted(os.listdir(directory)):
    if file.endswith(".safetensors"):
      out.update(load_file(os.path.join(directory, file)))
  return out


def test_round_trip_is_bitwise_and_transformers_reads_the_export(tmp_path):
  path, model = _hf_dir(tmp_path, "gelu")
  cfg, params = hf.load(path)
  out = str(tmp_path / "export")
  hf.save(cfg, params, out)
  want, got = _tensors(path), _tensors(out)
  assert sorted(want) == sorted(got)
  for name in want:
    assert want[name].dtype == got[name].dtype and want[name].tobytes() == got[name].tobytes(), name
  again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(again).__name__ == "GPT2LMHeadModel"
  assert again.config.activation_function == "gelu" and again.config.n_inner is None
  tokens = np.random.default_rng(2).integers(0, VOCAB, (1, 200)).astype(np.int32)
  np.testing.assert_allclose(_hf_logits(again, tokens), _ours_logits(cfg, params, tokens),
                             atol=1e-4, rtol=1e-4)
  cfg2, params2 = hf.load(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  # The hub's GPT-2 files name tensors without the "transformer." prefix; they read the same.
  from safetensors.numpy import save_file
  save_file({k[len("transformer."):]: v for k, v in want.items()},
            os.path.join(out, hf.SINGLE), metadata={"format": "pt"})
  jax.tree.map(np.testing.assert_array_equal, hf.load(out)[1], params)


def test_configs_it_cannot_run_fail_naming_the_key(tmp_path):
  path, _ = _hf_dir(tmp_path)
  config = json.load(open(os.path.join(path, hf.CONFIG)))
  for key, value in [("activation_function", "relu"), ("activation_function", "gelu_fast"),
                     ("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
                     ("add_cross_attention", True), ("scale_attn_weights", False),
                     ("tie_word_embeddings", False)]:
    json.dump({**config, key: value}, open(os.path.join(path, hf.CONFIG), "w"))
    with pytest.raises(hf.CheckpointFormatError, match=rf"config.json: {key}={value!r} is not "
                       "supported"):
      hf.load(path)
  json.dump({k: v for k, v in config.items() if k != "n_embd"},
            open(os.path.join(path, hf.CONFIG), "w"))
  with pytest.raises(hf.CheckpointFormatError, match="config.json has no 'n_embd'"):
    hf.load(path)
  # Old exporters' causal-mask buffers are not parameters; anything else unknown is an error.
  json.dump(config, open(os.path.join(path, hf.CONFIG), "w"))
  from safetensors.numpy import load_file, save_file
  file = os.path.join(path, hf.SINGLE)
  tensors = load_file(file)
  save_file({**tensors, "transformer.h.0.attn.bias": np.ones((1, 1, 8, 8), "f4"),
             "transformer.h.0.attn.masked_bias": np.ones((), "f4")}, file)
  hf.load(path)
  save_file({**tensors, "transformer.h.0.attn.q_attn.weight": np.ones((64, 64), "f4")}, file)
  with pytest.raises(hf.CheckpointFormatError, match="'transformer.h.0.attn.q_attn.weight' is not "
                     "a parameter of GPT2Config"):
    hf.load(path)
  for field, value in [("activation", "relu"), ("n_heads", 3), ("d_ff", -1), ("dtype", "int8")]:
    with pytest.raises(gpt2.GPT2ConfigError, match=rf"GPT2Config\.{field}"):
      gpt2.GPT2Config(**{"vocab_size": 32, "d_model": 16, "n_layers": 1, "n_heads": 2,
                         field: value})
