"""The README's Python example (a user-written payoff) runs as written and trains."""
import json
import os
import re
import shlex

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_payoff_example_trains(tmp_path, monkeypatch):
  text = open(os.path.join(ROOT, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python example"
  code = blocks[0]
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("GAMEJAX_DATA_DIR", str(tmp_path / "data"))
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)    # noqa: S102 -- the example, as written
  summary = scope["summary"]
  assert np.isfinite(summary["sft"]["loss"]) and summary["sft"]["steps"] == 20
  rows = [l for l in open(tmp_path / "runs/custom_payoff/metrics.jsonl")]
  assert "agent/confidence/entropy" in rows[-1] and "agent/sft/loss" in rows[-1]


def _readme_commands():
  """Every ``gamejax ...`` command of the README's shell code blocks, as argv lists."""
  text = open(os.path.join(ROOT, "README.md")).read()
  commands = []
  for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
    for line in block.replace("\\\n", " ").splitlines():      # continued lines joined
      for part in line.split("&&"):
        argv = shlex.split(part, comments=True)
        if argv and argv[0] == "gamejax":
          commands.append(argv[1:])
  return commands


def _localise(argv, tmp_path):
  """Paths made to work from anywhere: gin files from the repository, workdirs under tmp_path,
  the README's placeholder data folder and model directory real ones."""
  out = []
  for arg in argv:
    key, sep, value = arg.partition("=")
    if key == "--gin_file" and not os.path.isabs(value):
      arg = f"{key}={os.path.join(ROOT, value)}"
    elif key == "--workdir":
      arg = f"{key}={tmp_path / 'work' / value}"
    out.append(arg.replace("/path/to/folder", str(tmp_path / "texts")).replace(
        "/path/to/model", str(tmp_path / "model")))
  if any(a.endswith("experiments/smollm2/lora.gin") for a in out):   # its converted SmolLM2
    out.append(f"--gin.SMOLLM2='hf:{tmp_path / 'model'}'")
  return out


def _tokenizer(folder):
  """A 300-id byte-level BPE tokenizer with an end token and a chat template, in ``folder``."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([f"What is {i}+{i}? {2 * i}" for i in range(200)], trainer)
  tok.save(os.path.join(folder, "tokenizer.json"))
  template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<eos>{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "<eos>", "chat_template": template}, f)


def test_every_readme_command_parses(tmp_path, monkeypatch, capsys):
  """Each README command parses as written: ``train`` with ``--dry_run`` (the whole config built
  and validated, nothing created), the others by the command line's own parser."""
  from gamejax import cli
  (tmp_path / "texts").mkdir()
  (tmp_path / "texts" / "chat.jsonl").write_text('{"prompt": "hi", "response": "hello"}\n')
  monkeypatch.setenv("GAMEJAX_DATA_DIR", str(tmp_path / "data"))
  import jax
  from gamejax.interop import hf
  from gamejax.models import llama
  cfg = llama.LlamaConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64)
  hf.save(cfg, llama.init_params(cfg, jax.random.key(0)), str(tmp_path / "model"))
  _tokenizer(str(tmp_path / "model"))
  monkeypatch.chdir(ROOT)             # experiments/smollm2/lora.gin names its data relatively
  commands = _readme_commands()
  kinds = {argv[0] for argv in commands}
  assert {"train", "eval", "generate"} <= kinds and len(commands) >= 8, commands
  for argv in commands:
    argv = _localise(argv, tmp_path)
    if argv[0] == "train":
      code = cli.main([*argv, "--dry_run", "--no_progress"])
      err = capsys.readouterr().err
      assert code == 0, f"gamejax {' '.join(argv)}: {err}"
    else:
      cli._parser().parse_args(argv)     # pylint: disable=protected-access -- exits 2 if bad
  assert not (tmp_path / "work").exists() and not (tmp_path / "data").exists()
