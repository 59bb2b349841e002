"""Journey: seqio as geex-train's input (`train.data_source=@seqio_batches`).

A corpus -> `geex-train` on its seqio mixture 'codegeex' (MIXTURE_OR_TASK_NAME): 6 steps, stop,
resume to 12 == 12 straight, params bit-identical. Then a TFDS dataset registered by a user's
module (MIXTURE_OR_TASK_MODULE) mixed with the corpus trains too.
"""

import importlib.util
import json
import os
import pathlib
import socket
import subprocess

import gin
import jax
import numpy as np
import pytest

from data_fixtures import mixed_tree
from geex_jax.data import corpus as corpus_lib
from geex_jax.model import checkpoints
from geex_jax.training import cli as train_cli

from journey_tools import run_ok, script

pytestmark = pytest.mark.slow
pytest.importorskip("seqio")

STEPS = 12


def train_args(model_dir, corpus, *extra):
  return [
    "--gin_file=demo.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    f"--gin.CORPUS_DIR='{corpus}'",
    "--gin.train.data_source=@seqio_batches",
    "--gin.MIXTURE_OR_TASK_NAME='codegeex'",
    "--gin.BATCH_SIZE=4",
    "--gin.train.num_devices=1",
    "--gin.SEQUENCE_LENGTH=32",
    "--gin.NUM_LAYERS=1",
    f"--gin.TRAIN_STEPS={STEPS}",
    "--gin.train.checkpoint_every=6",
    "--gin.train.progress=False",
    "--gin.train.tensorboard=False",
    *extra,
  ]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("seqio_journey")
  mixed_tree(root / "src", n_per_lang=6)
  corpus_lib.build_corpus([str(root / "src")], str(root / "corpus"), progress=False)
  return root / "corpus"


def params_of(model_dir):
  _, params = checkpoints.load_params(str(model_dir))
  return [np.asarray(x) for x in jax.tree.leaves(params)]


def losses(model_dir):
  lines = (pathlib.Path(model_dir) / "metrics.jsonl").read_text().splitlines()
  return {json.loads(x)["step"]: json.loads(x)["loss"] for x in lines if x.strip()}


def test_stop_and_resume_equals_the_straight_run(corpus, tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  # The reference run in this process (saves a TensorFlow + JAX start-up); the others as a user.
  try:
    assert train_cli.main(train_args(straight, corpus)) == 0
  finally:
    gin.clear_config()
  run_ok("geex-train", *train_args(resumed, corpus, "--gin.train.stop_at_step=6"))
  assert checkpoints.latest_step(resumed) == 6
  r = run_ok("geex-train", *train_args(resumed, corpus))
  assert "resumed from step 6" in r.stdout + r.stderr
  for a, b in zip(params_of(straight), params_of(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert losses(resumed) == losses(straight) and sorted(losses(straight)) == list(range(1, 13))


TASK_MODULE = '''
from geex_jax.data import tfds_tasks

tfds_tasks.register_tfds_task(tfds_tasks.TfdsTextTask(
  name="journey_docs", tfds_name="{tfds_name}", data_dir="{data_dir}", text_feature="content",
  language="Python"))
tfds_tasks.register_mixture("journey_mix", [("codegeex", 1.0), ("journey_docs", 1.0)])
'''


def test_a_tfds_task_from_a_users_module_trains(corpus, tmp_path):
  spec = importlib.util.spec_from_file_location(
    "tfds_tasks_test", pathlib.Path(__file__).parents[1] / "data" / "test_tfds_tasks.py"
  )
  tfds_test = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tfds_test)
  tfds_name = tfds_test.build_tiny_tfds(tmp_path / "tfds")
  pkg = tmp_path / "user"
  pkg.mkdir()
  (pkg / "journey_user_tasks.py").write_text(
    TASK_MODULE.format(tfds_name=tfds_name, data_dir=tmp_path / "tfds")
  )
  env = {"PYTHONPATH": os.pathsep.join([str(pkg), os.environ.get("PYTHONPATH", "")])}
  model_dir = tmp_path / "run"
  run_ok(
    "geex-train",
    *train_args(model_dir, corpus, "--gin.TRAIN_STEPS=2"),
    "--gin.MIXTURE_OR_TASK_MODULE='journey_user_tasks'",
    "--gin.MIXTURE_OR_TASK_NAME='journey_mix'",
    env=env,
  )
  assert sorted(losses(model_dir)) == [1, 2]
  assert "MIXTURE_OR_TASK_NAME = 'journey_mix'" in (model_dir / "config.gin").read_text()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(model_dir, corpus, *extra):
  """geex-train as 2 processes x 4 CPU devices (one data shard each), as on a 2-host pod."""
  args = [a for a in train_args(model_dir, corpus, *extra) if a != "--gin.train.num_devices=1"]
  args += ["--gin.BATCH_SIZE=8", f"--coordinator_address=localhost:{_free_port()}"]
  env = {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
  }
  procs = [
    subprocess.Popen(
      [script("geex-train"), *args, "--num_processes=2", f"--process_id={i}"],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  return "".join(o + e for o, e in outputs)


def test_two_processes_stop_and_resume_equals_the_straight_run(corpus, tmp_path):
  """Each process checkpoints its own tf.data iterator (gathered into the one data state) and
  restores its own: 2 x 4 devices, 6 steps + resume to 12 == 12 straight, bit-identical."""
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  _two_processes(straight, corpus)
  _two_processes(resumed, corpus, "--gin.train.stop_at_step=6")
  assert checkpoints.latest_step(resumed) == 6
  assert "resumed from step 6" in _two_processes(resumed, corpus)
  for a, b in zip(params_of(straight), params_of(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert losses(resumed) == losses(straight) and sorted(losses(straight)) == list(range(1, 13))
