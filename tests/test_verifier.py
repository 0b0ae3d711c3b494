"""A Python verifier named by its import path judges GRPO on local_text prompts inside the compiled
step; its failures are counted; an Evaluation scores greedy answers with it; the experiment's
tokenizer is checked against the model and the data."""
import json

import jax
import pytest

from gamejax import config, run, sharding
from gamejax.models.llama import LlamaConfig
from gamejax.payoffs import grpo
from gamejax.players import verifiers
from gamejax.run.schema import ExperimentError

VERIFY = '''
import math
seen = []

def verify(prompt, completion):
  seen.append((prompt, completion))
  if prompt.startswith("3+"):
    raise ValueError("no such question")
  return float(completion.strip() == str(int(prompt.split("+")[0]) + 1))
'''
TINY = LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)


@pytest.fixture
def verifier_file(tmp_path):
  path = tmp_path / "my_checks.py"
  path.write_text(VERIFY)
  return str(path)


def _experiment(texts, verifier_file, steps=2, **rollout):
  data = config.local_text(path=str(texts), test_count=4)
  stage = run.Stage(name="grpo", data=data, payoff=grpo(2, beta=0.0), steps=steps, batch_size=4,
                    steps_per_call=2, seq_len=32,
                    rollout=run.Rollout(group_size=2, max_new_tokens=4, prompt_len=8,
                                        judge=verifiers.verifier(f"{verifier_file}:verify"),
                                        **rollout))
  return run.Experiment(stages=[stage], model=TINY, evaluation=run.Evaluation(
      data=data, verifier=verifiers.verifier(f"{verifier_file}:verify"), num_examples=4,
      max_new_tokens=4, batch_size=4))


def test_the_verifier_sees_the_users_prompt_and_the_decoded_answer_and_its_errors_are_counted(
    tmp_path, sums_texts, verifier_file):
  exp = _experiment(sums_texts, verifier_file, steps=4)
  exp.validate()
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  result = run.run_stage(exp, 0, None, str(tmp_path / "run"), mesh, progress=False,
                         eval_examples=run.load_eval_examples(exp), log=lambda _: None)
  module = verifiers._from_file(verifier_file)
  prompts = {p for p, _ in module.seen}
  assert prompts <= {f"{i}+1=" for i in range(40)} and len(prompts) > 4   # the JSONL's words
  assert all(isinstance(c, str) for _, c in module.seen)
  rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
  errors = sum(r.get("judge/verifier_errors", 0) * 2 for r in rows)       # mean over 2 steps
  raised = sum(p.startswith("3+") for p, _ in module.seen[:-4])            # before evaluation
  assert errors == raised
  assert result.metrics["nonfinite_rewards"] == raised
  assert result.metrics["examples"] == 4 and 0.0 <= result.metrics["accuracy"] <= 1.0


def test_bad_verifiers_and_tokenizers_are_config_errors(tmp_path, sums_texts, verifier_file):
  with pytest.raises(ExperimentError, match="cannot import 'no_such_package_xyz.mod' \\(ModuleNotFoundError"):
    _experiment(sums_texts, "no_such_package_xyz.mod").validate()
  with pytest.raises(ExperimentError, match="has no function 'verify'"):
    _experiment(sums_texts, "math").validate()
  exp = _experiment(sums_texts, verifier_file)
  import dataclasses
  with pytest.raises(ExperimentError, match=r"Experiment.tokenizer='gpt2': unknown tokenizer"):
    dataclasses.replace(exp, tokenizer="gpt2").validate()
  # A tokenizer with more ids than the embedding has rows; local_text naming another tokenizer.
  tok_dir = _bpe_dir(tmp_path)
  with pytest.raises(ExperimentError, match=r"vocab_size=320 is smaller than Experiment"
                     r".tokenizer='hf:.*'s 400 ids"):
    dataclasses.replace(exp, tokenizer=f"hf:{tok_dir}").validate()
  with pytest.raises(ExperimentError, match="tokenizes with 'byte' but Experiment.tokenizer"):
    dataclasses.replace(exp, tokenizer=f"hf:{tok_dir}",
                        model=dataclasses.replace(TINY, vocab_size=400)).validate()
  arena = run.Stage(name="sft", data=config.arena(num_train=10, num_test=2),
                    payoff=grpo(2, beta=0.0), steps=2)
  with pytest.raises(ExperimentError, match="'arithmetic_arena' is written in byte tokens"):
    run.Experiment(stages=[arena], model=dataclasses.replace(TINY, vocab_size=400),
                   tokenizer=f"hf:{tok_dir}").validate()


def _bpe_dir(tmp_path):
  """A 400-id byte-level BPE tokenizer folder (tokenizer.json + tokenizer_config.json)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([f"{i} plus {i + 1} is {2 * i + 1}" for i in range(300)] * 3, trainer)
  folder = tmp_path / "tok"
  folder.mkdir()
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
  assert tok.get_vocab_size() == 400
  return str(folder)


def test_the_prompt_of_an_example_is_the_text_of_its_opening_move(tmp_path, sums_texts):
  from gamejax.data import sources
  from gamejax.data.prompts import opening_move
  from gamejax.data.tokenizer import ByteTokenizer
  data = config.local_text(path=str(sums_texts), test_count=4)
  source = data.load("train", sources.resolve_data_dir(None))
  prompt_of = verifiers.local_text_prompts(source, str(sums_texts))
  for i in range(len(source)):
    example = source[i]
    assert prompt_of(i) == ByteTokenizer().decode(opening_move(example["tokens"],
                                                               example["players"])), i
