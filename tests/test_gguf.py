"""GGUF files in (``gamejax.interop.gguf``), checked against transformers' own GGUF reader: a
random Llama written in llama.cpp's layout (q/k rows permuted for its RoPE, some tensors
quantised) is read by both, which must agree on the dequantised weights and on the logits of a
512-token prompt; a truncated file and a foreign architecture fail naming the file."""
import numpy as np
import pytest

from gamejax.interop import gguf as gguf_in
from gamejax.interop.hf import CheckpointFormatError, hf_arrays
from gamejax.models import llama

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V, D, F, H, KV, L = 128, 64, 96, 4, 2, 2


def _llama_cpp_permute(w, heads):
  """llama.cpp's convert_hf_to_gguf layout of q/k: each head's two RoPE halves interleaved."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write(path, tied, arch="llama", seed=0):
  rng = np.random.default_rng(seed)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(L)
  w.add_context_length(1024)
  w.add_embedding_length(D)
  w.add_feed_forward_length(F)
  w.add_head_count(H)
  w.add_head_count_kv(KV)
  w.add_rope_freq_base(50000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(V)
  w.add_rope_dimension_count(D // H)
  w.add_tokenizer_model("gpt2")
  w.add_token_list([f"t{i}" for i in range(V)])
  w.add_token_types([1] * V)
  w.add_token_merges([])
  q8 = gguf.GGMLQuantizationType.Q8_0
  tensors = {"token_embd.weight": (rng.normal(0, 0.5, (V, D)), None),
             "output_norm.weight": (1 + 0.2 * rng.normal(size=D), None)}
  if not tied:
    tensors["output.weight"] = (rng.normal(0, 0.1, (V, D)), q8)
  for i in range(L):
    b = f"blk.{i}."
    tensors.update({
        b + "attn_q.weight": (_llama_cpp_permute(rng.normal(0, 0.2, (D, D)), H), q8),
        b + "attn_k.weight": (_llama_cpp_permute(rng.normal(0, 0.2, (KV * D // H, D)), KV), None),
        b + "attn_v.weight": (rng.normal(0, 0.2, (KV * D // H, D)), q8),
        b + "attn_output.weight": (rng.normal(0, 0.2, (D, D)), None),
        b + "ffn_gate.weight": (rng.normal(0, 0.2, (F, D)), q8),
        b + "ffn_up.weight": (rng.normal(0, 0.2, (F, D)), None),
        b + "ffn_down.weight": (rng.normal(0, 0.2, (D, F)), None),
        b + "attn_norm.weight": (1 + 0.2 * rng.normal(size=D), None),
        b + "ffn_norm.weight": (1 + 0.2 * rng.normal(size=D), None)})
  for name, (x, kind) in tensors.items():
    x = x.astype(np.float32)
    if kind is None:
      w.add_tensor(name, x)
    else:
      w.add_tensor(name, gguf.quants.quantize(x, kind), raw_dtype=kind)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_matches_transformers_gguf_reader(tmp_path, tied):
  _write(tmp_path / "m.gguf", tied)
  cfg, params = gguf_in.load(str(tmp_path / "m.gguf"))
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.tie_embeddings) == (H, KV, F, tied)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  for name, x in hf_arrays(cfg, params).items():
    np.testing.assert_array_equal(np.asarray(x), state[name], err_msg=name)
  tokens = np.random.default_rng(1).integers(0, V, (1, 512)).astype(np.int32)
  with torch.no_grad():
    want = model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  got = llama.apply(cfg, params, tokens, np.arange(512, dtype=np.int32)[None],
                    np.ones_like(tokens))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_bad_gguf_files_name_the_file(tmp_path):
  _write(tmp_path / "m.gguf", True)
  data = (tmp_path / "m.gguf").read_bytes()
  (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 3])
  with pytest.raises(CheckpointFormatError, match="cut.gguf: not a readable GGUF file"):
    gguf_in.load(str(tmp_path / "cut.gguf"))
  with pytest.raises(CheckpointFormatError, match="no such GGUF file"):
    gguf_in.load(str(tmp_path / "none.gguf"))
  _write(tmp_path / "other.gguf", True, arch="falcon")
  with pytest.raises(CheckpointFormatError, match=r"architecture 'falcon' is not supported; "
                     r"supported: \['llama'\]"):
    gguf_in.load(str(tmp_path / "other.gguf"))
