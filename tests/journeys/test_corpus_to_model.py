"""Journey: corpus -> model, with the console scripts and the released tokenizer.

`geex-data build --src` -> `geex-train` with TOKENIZER_DIR (the released BPE) -> `kill -9`
mid-run -> the rerun resumes and ends identical to an uninterrupted run -> `geex-sample` on the
run dir -> round trip through the released layout -> fine-tune from it (runs/finetune.gin,
INIT_FROM).
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sysconfig
import time

import jax
import numpy as np
import pytest

from geex_jax.model import checkpoints

from journey_tools import run_ok, script

pytestmark = pytest.mark.slow

STEPS = 24


def train_args(model_dir, corpus, tokenizer_dir, *extra):
  return [
    "--gin_file=models/tiny.gin",
    "--gin_file=runs/pretrain.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    f"--gin.CORPUS_DIR='{corpus}'",
    f"--gin.TOKENIZER_DIR='{tokenizer_dir}'",
    "--gin.BATCH_SIZE=8",
    "--gin.SEQUENCE_LENGTH=64",
    f"--gin.TRAIN_STEPS={STEPS}",
    "--gin.train.checkpoint_every=4",
    "--gin.learning_rate_schedule.warmup_steps=4",
    "--gin.learning_rate_schedule.peak=1e-3",
    "--gin.train.progress=False",
    "--gin.train.tensorboard=False",
    *extra,
  ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A corpus built from a small source tree: two stdlib packages (Python) and a C file."""
  root = tmp_path_factory.mktemp("corpus")
  src = root / "src"
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  for package in ("json", "email"):
    shutil.copytree(
      stdlib / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
  (src / "sum.c").write_text(
    "\n".join(f"int add_{i}(int a, int b) {{\n    return a + b + {i};\n}}\n" for i in range(60))
  )
  out = root / "corpus"
  run_ok("geex-data", "build", "--src", src, "--out", out, "--no-progress")
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["languages"]["Python"]["documents"] >= 10
  assert "C" in manifest["languages"]
  return out


def metrics_steps(model_dir) -> list[int]:
  path = pathlib.Path(model_dir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def params_of(model_dir):
  _, params = checkpoints.load_params(str(model_dir))
  return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.fixture(scope="module")
def straight(corpus, tokenizer_dir, tmp_path_factory):
  """The uninterrupted run."""
  model_dir = tmp_path_factory.mktemp("straight") / "run"
  r = run_ok("geex-train", *train_args(model_dir, corpus, tokenizer_dir))
  assert "random init" in r.stdout + r.stderr
  return model_dir


def test_kill_9_then_rerun_equals_the_uninterrupted_run(straight, corpus, tokenizer_dir, tmp_path):
  model_dir = tmp_path / "run"
  args = [script("geex-train"), *train_args(model_dir, corpus, tokenizer_dir)]
  proc = subprocess.Popen(
    args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
  )
  try:
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
      steps = metrics_steps(model_dir)
      if steps and steps[-1] >= 10:
        break
      time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  killed_at = metrics_steps(model_dir)[-1]
  assert killed_at < STEPS
  r = run_ok("geex-train", *train_args(model_dir, corpus, tokenizer_dir))
  assert "resumed from step" in r.stdout + r.stderr
  for a, b in zip(params_of(straight), params_of(model_dir)):
    np.testing.assert_array_equal(a, b)
  # The log reads like one run: every step once, in order, with the same losses.
  assert metrics_steps(model_dir) == list(range(1, STEPS + 1))
  losses = lambda d: [
    json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()
  ]
  assert losses(model_dir) == losses(straight)


def test_sample_the_run_then_fine_tune_from_its_released_layout(
  straight, corpus, tokenizer_dir, tmp_path
):
  r = run_ok(
    "geex-sample",
    "--checkpoint",
    straight,
    "--tokenizer",
    tokenizer_dir,
    "--prompt",
    "import json\n",
    "--language",
    "python",
    "--max_new_tokens",
    16,
  )
  assert "1 completions" in r.stderr
  # Sampling a trainer's step directory says nothing a user cannot act on (Orbax's "Metadata
  # file does not exist" for params/ was printed once).
  assert "WARNING" not in r.stderr, r.stderr
  released = tmp_path / "released" / "model.pt"
  run_ok("geex-convert", "jax-to-torch", straight, released, "--dtype", "fp32")
  ckpt = tmp_path / "ckpt" / "from_release"
  run_ok("geex-convert", "torch-to-jax", released, ckpt, "--dtype", "fp32", "--verify")
  ft = tmp_path / "ft"
  r = run_ok(
    "geex-train",
    "--gin_file=models/tiny.gin",
    "--gin_file=runs/finetune.gin",
    *train_args(ft, corpus, tokenizer_dir)[2:],
    f"--gin.INIT_FROM='{ckpt}'",
    "--gin.TRAIN_STEPS=2",
    "--gin.train.checkpoint_every=2",
  )
  assert "params from" in r.stdout + r.stderr
  first = lambda d: json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["loss"]
  # Starting from the trained params, the fine-tune's first loss is far below a fresh model's.
  assert first(ft) < first(straight) - 1.0
