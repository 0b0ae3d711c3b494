"""Hugging Face directories in and out (``gamejax.interop.hf``), checked against transformers
itself: a random model of each family (Llama, Qwen2, Qwen3, ...) saved by ``save_pretrained``
is read by gamejax and gives
the same logits on a 512-token prompt (so RoPE is exercised far out) and the same greedy tokens;
gamejax's export is read back by transformers with the same logits; HF -> gamejax -> HF is
bitwise; every malformed directory fails naming the file and tensor."""
import json
import os

import jax
import numpy as np
import pytest

from gamejax import sampling
from gamejax.interop import hf
from gamejax.models import lm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPT_LEN, NEW = 512, 32
LLAMA_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
# variant -> (transformers config class name, its keyword arguments over the shared small ones).
VARIANTS = {
    "tied_gqa": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=2)),
    "untied_mha": ("LlamaConfig", dict(tie_word_embeddings=False, num_key_value_heads=4,
                                       rope_parameters={"rope_type": "default",
                                                        "rope_theta": 500000.0})),
    "llama3_rope": ("LlamaConfig", dict(
        tie_word_embeddings=False, num_key_value_heads=1, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "qwen2_bias": ("Qwen2Config", dict(tie_word_embeddings=False, num_key_value_heads=2,
                                       rope_parameters={"rope_type": "default",
                                                        "rope_theta": 1e6})),
    "qwen3_qk_norm": ("Qwen3Config", dict(tie_word_embeddings=True, num_key_value_heads=2,
                                          head_dim=24)),
}
MODEL_CLASSES = {"LlamaConfig": "LlamaForCausalLM", "Qwen2Config": "Qwen2ForCausalLM",
                 "Qwen3Config": "Qwen3ForCausalLM"}


def _hf_dir(tmp_path, variant, seed=0):
  """A random HF model of ``variant`` saved by transformers, and the model."""
  torch.manual_seed(seed)
  config_class, extra = VARIANTS[variant]
  kw = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, rms_norm_eps=1e-5, max_position_embeddings=1024,
            rope_parameters=LLAMA_ROPE)
  kw.update(extra)
  config = getattr(transformers, config_class)(**kw)
  model = getattr(transformers, MODEL_CLASSES[config_class])(config).eval()
  with torch.no_grad():               # norms away from 1 and biases away from 0, so a swap is seen
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1 + 0.3 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.3 * torch.randn_like(p))
  path = str(tmp_path / variant)
  model.save_pretrained(path)
  return path, model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _ours_logits(cfg, params, tokens):
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  return np.asarray(jax.jit(lambda p: lm.apply(cfg, p, tokens, positions,
                                                   np.ones_like(tokens)))(params))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_import_matches_transformers_logits_and_greedy_tokens(tmp_path, variant):
  path, model = _hf_dir(tmp_path, variant)
  cfg, params = hf.load(path)
  assert cfg.tie_embeddings == model.config.tie_word_embeddings
  assert ("lm_head" in params) != cfg.tie_embeddings
  tokens = np.random.default_rng(1).integers(0, 96, (2, PROMPT_LEN)).astype(np.int32)
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


def _tensors(directory):
  from safetensors.numpy import load_file
  out = {}
  for file in sorted(os.listdir(directory)):
    if file.endswith(".safetensors"):
      out.update(load_file(os.path.join(directory, file)))
  return out


@pytest.mark.parametrize("variant, shard_bytes", [("untied_mha", 5 * 2**30),
                                                  ("llama3_rope", 20_000),
                                                  ("qwen2_bias", 5 * 2**30),
                                                  ("qwen3_qk_norm", 20_000)])
def test_round_trip_is_bitwise_and_transformers_reads_the_export(tmp_path, variant, shard_bytes):
  path, model = _hf_dir(tmp_path, variant)
  cfg, params = hf.load(path)
  out = str(tmp_path / "export")
  hf.save(cfg, params, out, max_shard_bytes=shard_bytes)
  assert os.path.isfile(os.path.join(out, hf.INDEX)) == (shard_bytes < 2**20)
  want, got = _tensors(path), _tensors(out)
  assert sorted(want) == sorted(got)
  for name in want:
    assert want[name].dtype == got[name].dtype and want[name].tobytes() == got[name].tobytes(), name
  again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = np.random.default_rng(2).integers(0, 96, (1, 200)).astype(np.int32)   # past 64: scaled
  np.testing.assert_allclose(_hf_logits(again, tokens), _ours_logits(cfg, params, tokens),
                             atol=1e-4, rtol=1e-4)
  cfg2, params2 = hf.load(out)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def _rewrite(path, edit):
  """Loads the directory's single safetensors file, edits the dict, writes it back."""
  from safetensors.numpy import load_file, save_file
  file = os.path.join(path, hf.SINGLE)
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={"format": "pt"})


def test_malformed_directories_name_the_file_and_tensor(tmp_path):
  path, _ = _hf_dir(tmp_path, "tied_gqa")
  with pytest.raises(hf.CheckpointFormatError, match="no config.json"):
    hf.load(str(tmp_path))
  config = json.load(open(os.path.join(path, hf.CONFIG)))
  json.dump({**config, "architectures": ["MambaForCausalLM"]},
            open(os.path.join(path, hf.CONFIG), "w"))
  with pytest.raises(hf.CheckpointFormatError, match=r"'MambaForCausalLM' is not supported; "
                     r"supported: \[.*'LlamaForCausalLM', 'Qwen2ForCausalLM', 'Qwen3ForCausalLM'"):
    hf.load(path)
  json.dump(config, open(os.path.join(path, hf.CONFIG), "w"))
  # A tied head shipped anyway is fine when it is the embedding, an error when it is not.
  _rewrite(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
  hf.load(path)
  _rewrite(path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
  with pytest.raises(hf.CheckpointFormatError, match="'lm_head.weight' differs from the embed"):
    hf.load(path)
  _rewrite(path, lambda t: t.pop("lm_head.weight"))
  _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(64, "f4")}))
  with pytest.raises(hf.CheckpointFormatError,
                     match=r"model.safetensors: tensor 'model.layers.0.self_attn.q_proj.bias' is "
                           "not a parameter"):
    hf.load(path)
  _rewrite(path, lambda t: t.pop("model.layers.0.self_attn.q_proj.bias"))
  _rewrite(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
  with pytest.raises(hf.CheckpointFormatError,
                     match="tensor 'model.layers.1.mlp.up_proj.weight' is missing"):
    hf.load(path)
  _rewrite(path, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": np.zeros((64, 112),
                                                                                   "f4")}))
  with pytest.raises(hf.CheckpointFormatError,
                     match=r"'model.layers.1.mlp.up_proj.weight' has shape \(64, 112\); the "
                           r"config implies \(112, 64\)"):
    hf.load(path)
  file = os.path.join(path, hf.SINGLE)
  data = open(file, "rb").read()
  open(file, "wb").write(data[:len(data) // 2])           # a truncated download
  with pytest.raises(hf.CheckpointFormatError, match="model.safetensors"):
    hf.load(path)


def test_export_refuses_an_existing_directory_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
  path, _ = _hf_dir(tmp_path, "tied_gqa")
  cfg, params = hf.load(path)
  with pytest.raises(FileExistsError):
    hf.save(cfg, params, path)
  out = str(tmp_path / "out")

  def fail(*args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(hf, "_write_text", fail)
  with pytest.raises(OSError, match="disk full"):
    hf.save(cfg, params, out)
  assert sorted(os.listdir(tmp_path)) == ["tied_gqa"]


def test_cli_export_of_a_trained_stage_loads_in_transformers(tmp_path, capsys, sums_texts):
  from gamejax import cli, run
  texts = sums_texts
  work, out = tmp_path / "run", tmp_path / "hf_sft"
  exp_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "experiments")
  assert cli.main(["train", f"--gin_file={exp_dir}/text/sft.gin",
                   f"--gin_file={exp_dir}/models/tiny.gin", f"--gin.local_text.path='{texts}'",
                   "--gin.local_text.test_count=2", "--gin.sft/Stage.steps=2",
                   "--gin.sft/Stage.steps_per_call=2", "--gin.sft/Stage.batch_size=4",
                   "--gin.sft/Stage.seq_len=32", f"--workdir={work}", "--no_progress"]) == 0
  assert cli.main(["export", f"--workdir={work}", "--format=hf", str(out)]) == 0
  assert cli.main(["export", f"--workdir={work}", "--format=hf", str(out)]) == 2
  assert "exists" in capsys.readouterr().err
  assert cli.main(["export", f"--workdir={work}", "--stage=rl", "--format=hf",
                   str(tmp_path / "x")]) == 2
  assert "not a stage of this run" in capsys.readouterr().err and not (tmp_path / "x").exists()
  exp, _ = cli._load_run(str(work))
  params = run.restore_params(exp, 0, str(work))["agent"]
  model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
  tokens = np.array([[1] + [b + 3 for b in b"12+1=13"]], np.int32)
  np.testing.assert_allclose(_hf_logits(model, tokens), _ours_logits(exp.model, params, tokens),
                             atol=1e-4, rtol=1e-4)
  # A new run starts from the export: Experiment.model from its config.json, the learner's
  # params from its tensors (a learning rate of 0 keeps them, so re-exporting is bitwise).
  again, out2 = tmp_path / "again", tmp_path / "hf_again"
  common = [f"--gin_file={exp_dir}/text/sft.gin", f"--gin.local_text.path='{texts}'",
            "--gin.local_text.test_count=2", "--gin.sft/Stage.steps=2",
            "--gin.sft/Stage.steps_per_call=2", "--gin.sft/Stage.batch_size=4",
            "--gin.sft/Stage.seq_len=32", "--no_progress"]
  assert cli.main(["train", *common, f"--workdir={again}", f"--gin.sft/Stage.init_from='hf:{out}'",
                   "--gin.Experiment.model=@pretrained_model()",
                   f"--gin.pretrained_model.checkpoint='hf:{out}'",
                   "--gin.sft/Optimizer.learning_rate=0.0"]) == 0
  assert cli.main(["export", f"--workdir={again}", "--format=hf", str(out2)]) == 0
  assert _tensors(str(out)).keys() == _tensors(str(out2)).keys()
  for name, x in _tensors(str(out)).items():
    assert x.tobytes() == _tensors(str(out2))[name].tobytes(), name
  # Starting from a checkpoint of another shape than Experiment.model is a config error.
  capsys.readouterr()
  assert cli.main(["train", *common, f"--gin_file={exp_dir}/models/tiny.gin",
                   f"--workdir={tmp_path / 'bad'}", f"--gin.sft/Stage.init_from='hf:{out}'",
                   "--gin.LlamaConfig.d_model=64"]) == 2
  err = capsys.readouterr().err
  assert "holds another model than Experiment.model" in err and "'d_model': (64, 32)" in err
  assert not (tmp_path / "bad").exists()
