"""Journey: a run whose every path is gs://, against a GCS emulator on localhost.

A user builds a corpus, copies it to the bucket, trains 6 of 12 steps into gs://BUCKET/run (corpus
on gs:// too), resumes to 12, samples from the run and converts it to PyTorch and back, with the
console scripts, exactly as documented; the project is pointed at the emulator by environment
variables alone (`emulator_env`). The resumed remote run must equal an uninterrupted local run
bit for bit.

The emulator is gcp-storage-emulator, run by this file (`python test_remote_storage.py serve PORT
BUCKET`) with one gap filled: its media downloads lack the `x-goog-generation` header, so every
generation TensorStore reads back is malformed and the OCDBT writes of an Orbax save that follow
a read fail ("Malformed StorageGeneration"). Real GCS always sends the header.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

# TensorStore accepts only real GCS bucket names (3 to 63 characters): "b" is refused.
BUCKET = "geex-test"
HERE = pathlib.Path(__file__).resolve()


def _serve(port: int, bucket: str) -> None:
  """The emulator (in memory, bucket created), its downloads sending their generation."""
  from gcp_storage_emulator.handlers import objects

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # pylint: disable=broad-except  (not found: the handler answers 404)
      obj = None
    if obj:
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
    return download(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation  # before the server module builds its routes
  from gcp_storage_emulator.server import create_server

  create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
  _serve(int(sys.argv[2]), sys.argv[3])
  sys.exit(0)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def emulator_env(url: str) -> dict:
  """What points geex-jax at an emulator: four variables (README, "Remote storage")."""
  return {
    "STORAGE_EMULATOR_HOST": url,  # gcsfs (epath) and google-cloud-storage
    "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore (Orbax)
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
    "EPATH_USE_TF": "0",  # epath through gcsfs: TF's gfile ignores emulators
  }


# Guards, not configuration: no Google auth library may look for a GCE metadata server (a host
# off this machine) while it searches for credentials; the metadata "server" is a closed local
# port.
NO_METADATA_SERVER = {
  "NO_GCE_CHECK": "true",
  "GCE_METADATA_HOST": "127.0.0.1:9",
  "GCE_METADATA_IP": "127.0.0.1:9",
}


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A GCS emulator on a free localhost port with bucket BUCKET; the environment for it, also set
  in this process (restored afterwards)."""
  pytest.importorskip("gcp_storage_emulator")
  pytest.importorskip("gcsfs")
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = tmp_path_factory.mktemp("emulator") / "emulator.log"
  with open(log, "w") as out:
    proc = subprocess.Popen(
      [sys.executable, str(HERE), "serve", str(port), BUCKET], stdout=out, stderr=subprocess.STDOUT
    )
  try:
    deadline = time.time() + 60
    while True:
      assert proc.poll() is None, log.read_text()[-3000:]
      try:
        with urllib.request.urlopen(f"{url}/storage/v1/b/{BUCKET}", timeout=2) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      assert time.time() < deadline, "the emulator did not start: " + log.read_text()[-3000:]
      time.sleep(0.2)
    env = {**emulator_env(url), **NO_METADATA_SERVER}
    # epath caches its "use TensorFlow's gfile" decision (functools.cache) the first time this
    # process touches a gs:// path; earlier tests in the same pytest run may have made it
    # without EPATH_USE_TF=0. The console scripts run fresh, so only this process needs it.
    from etils.epath import gpath

    with pytest.MonkeyPatch.context() as mp:
      for key, value in env.items():
        mp.setenv(key, value)
      gpath._is_tf_installed.cache_clear()
      try:
        yield {"url": url, "env": env}
      finally:
        gpath._is_tf_installed.cache_clear()
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _script(name: str, module: str) -> list[str]:
  """A console script as installed beside this interpreter, else its module."""
  path = pathlib.Path(sys.executable).parent / name
  return [str(path)] if path.exists() else [sys.executable, "-m", module]


GEEX = {
  "geex-train": "geex_jax.training",
  "geex-sample": "geex_jax.inference.cli",
  "geex-convert": "geex_jax.conversion.cli",
  "geex-data": "geex_jax.data.cli",
}


def _run(gcs, cwd, name, *args, expect=0) -> subprocess.CompletedProcess:
  env = dict(
    os.environ,
    **gcs["env"],
    JAX_PLATFORMS="cpu",
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
  )
  proc = subprocess.run(
    [*_script(name, GEEX[name]), *args],
    cwd=cwd,
    env=env,
    text=True,
    capture_output=True,
    timeout=600,
  )
  assert proc.returncode == expect, (
    f"{name} {' '.join(args)}: rc {proc.returncode}\n" + (proc.stderr[-4000:])
  )
  return proc


def _train_args(model_dir: str, corpus_dir: str, *extra: str) -> list[str]:
  return [
    "--gin_file=models/tiny.gin",
    "--gin_file=runs/pretrain.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    f"--gin.CORPUS_DIR='{corpus_dir}'",
    "--gin.VOCAB_SIZE=512",
    "--gin.MAX_POSITION=32",
    "--gin.BATCH_SIZE=8",
    "--gin.SEQUENCE_LENGTH=32",
    "--gin.TRAIN_STEPS=12",
    "--gin.train.checkpoint_every=3",
    "--gin.learning_rate_schedule.peak=3e-3",
    "--gin.learning_rate_schedule.warmup_steps=2",
    "--gin.learning_rate_schedule.decay_steps=40",
    "--gin.train.progress=False",
    *extra,
  ]


def _sources(root: pathlib.Path) -> None:
  """A few Python files the corpus filters keep (1-100 KB, code-like)."""
  for i in range(6):
    body = "".join(
      f"def function_{i}_{k}(value, other):\n    return value * {k} + other\n\n" for k in range(40)
    )
    (root / f"module_{i}.py").write_text(f"# module {i}\n" + body)


@pytest.fixture(scope="module")
def runs(gcs, tmp_path_factory):
  """The journey up to a finished run: corpus built locally and copied to gs://; 6 steps into
  gs://BUCKET/run; the log of a run killed past its checkpoint; resumed to 12; and the same 12
  steps uninterrupted into the local (relative) directory `local`."""
  from geex_jax import fileio

  work = tmp_path_factory.mktemp("journey")
  (work / "src").mkdir()
  _sources(work / "src")
  _run(gcs, work, "geex-data", "build", "--src", "src", "--out", "corpus", "--no-progress")
  fileio.copy_tree(work / "corpus", f"gs://{BUCKET}/corpus")

  gs_run = f"gs://{BUCKET}/run"
  first = _run(
    gcs,
    work,
    "geex-train",
    *_train_args(gs_run, f"gs://{BUCKET}/corpus", "--gin.train.stop_at_step=6"),
  )
  assert "steps 0->6" in first.stderr, first.stderr[-2000:]
  # A run killed after its step-6 checkpoint had uploaded its log up to step 8, and a torn line:
  # the resumed run logs steps 7 and 8 again and must drop these.
  log = fileio.as_path(f"{gs_run}/metrics.jsonl")
  text = log.read_text()
  assert [json.loads(line)["step"] for line in text.splitlines()] == list(range(1, 7))
  log.write_text(text + '{"step": 7, "loss": 1.0}\n{"step": 8, "loss": 1.0}\n{"step": 9, "lo')
  resumed = _run(gcs, work, "geex-train", *_train_args(gs_run, f"gs://{BUCKET}/corpus"))
  assert "resumed from step 6" in resumed.stderr, resumed.stderr[-2000:]

  _run(gcs, work, "geex-train", *_train_args("local", "corpus"))  # relative: stays local
  return {"work": work, "gs_run": gs_run, "local_run": work / "local"}


@pytest.mark.slow
def test_resumed_gs_run_equals_an_uninterrupted_local_run(runs):
  import jax
  import numpy as np
  from geex_jax import fileio
  from geex_jax.model import checkpoints
  from geex_jax.training import metrics as train_metrics

  gs_run, local_run = runs["gs_run"], runs["local_run"]
  assert checkpoints.latest_step(gs_run) == checkpoints.latest_step(local_run) == 12
  config_gs, params_gs = checkpoints.load_params(gs_run)
  config_local, params_local = checkpoints.load_params(local_run)
  assert config_gs == config_local
  for a, b in zip(jax.tree.leaves(params_gs), jax.tree.leaves(params_local)):
    np.testing.assert_array_equal(a, b)
  # The log reads like one run: each step once, in order, with the uninterrupted run's losses.
  lines = fileio.as_path(f"{gs_run}/metrics.jsonl").read_text().splitlines()
  steps = [json.loads(line)["step"] for line in lines]
  assert steps == list(range(1, 13)), steps
  local = train_metrics.read_metrics(local_run)
  assert [json.loads(line)["loss"] for line in lines] == [local[s]["loss"] for s in steps]
  assert any(
    p.name.startswith("events.out.tfevents")
    for p in fileio.as_path(f"{gs_run}/tensorboard").iterdir()
  )
  assert not (runs["work"] / "gs:").exists()  # no URL became a local folder


@pytest.mark.slow
def test_sample_from_the_gs_run(gcs, runs):
  args = ["--tokenizer", "bytes", "--prompt", "def function_1(value):\n", "--max_new_tokens", "12"]
  remote = _run(gcs, runs["work"], "geex-sample", "--checkpoint", runs["gs_run"], *args)
  local = _run(gcs, runs["work"], "geex-sample", "--checkpoint", "local", *args)
  assert remote.stdout and remote.stdout == local.stdout


@pytest.mark.slow
def test_convert_reads_and_writes_gs(gcs, runs, monkeypatch):
  import jax
  import numpy as np
  import torch
  from geex_jax.conversion import cli, convert
  from geex_jax import fileio
  from geex_jax.model import checkpoints

  work, gs_run = runs["work"], runs["gs_run"]

  def state(path):
    return torch.load(path, weights_only=True, map_location="cpu")

  def assert_same(a, b, where=""):
    if isinstance(a, dict):
      assert sorted(a) == sorted(b), where
      for k in a:
        assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, torch.Tensor):
      assert a.dtype == b.dtype and torch.equal(a, b), where
    else:
      assert a == b, where

  def assert_params_equal(path, reference):
    _, got = checkpoints.load_params(path, scan_layers=False)
    _, want = checkpoints.load_params(reference, scan_layers=False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)

  # jax-to-torch reads the gs:// run (TensorStore, in place) like the local one.
  _run(gcs, work, "geex-convert", "jax-to-torch", gs_run, "from_gs/run.pt", "--dtype", "fp32")
  _run(gcs, work, "geex-convert", "jax-to-torch", "local", "from_local/run.pt", "--dtype", "fp32")
  released = state(work / "from_local" / "run.pt")
  assert_same(state(work / "from_gs" / "run.pt"), released)

  # torch-to-jax writes to gs:// (staged locally, verified, uploaded, moved): loads back equal.
  ckpt = f"gs://{BUCKET}/ckpt/tiny"
  out = _run(
    gcs,
    work,
    "geex-convert",
    "torch-to-jax",
    "from_local/run.pt",
    ckpt,
    "--dtype",
    "fp32",
    "--verify",
  )
  assert "agree" in out.stdout and ckpt in out.stdout, out.stdout
  assert_params_equal(ckpt, runs["local_run"])
  listed = fileio.list_files(f"gs://{BUCKET}/ckpt")
  assert listed and all(p.startswith("tiny/") for p in listed), listed  # nothing staged is left

  # A released file on gs:// (downloaded first) into a local folder whose parents do not exist.
  fileio.copy_file(work / "from_local" / "run.pt", f"gs://{BUCKET}/released/run.pt")
  _run(
    gcs,
    work,
    "geex-convert",
    "torch-to-jax",
    f"gs://{BUCKET}/released/run.pt",
    "new/nested/ckpt",
    "--dtype",
    "fp32",
  )
  assert_params_equal(work / "new" / "nested" / "ckpt", runs["local_run"])

  # gs:// to gs://, a single .pt object.
  _run(
    gcs, work, "geex-convert", "jax-to-torch", ckpt, f"gs://{BUCKET}/back/run.pt", "--dtype", "fp32"
  )
  fileio.copy_file(f"gs://{BUCKET}/back/run.pt", work / "back.pt")
  assert_same(state(work / "back.pt"), released)

  # An existing gs:// DST needs --overwrite; a failed conversion leaves nothing in the bucket.
  monkeypatch.chdir(work)
  with pytest.raises(SystemExit) as e:
    cli.main(["torch-to-jax", "from_local/run.pt", ckpt, "--dtype", "fp32"])
  assert e.value.code == 2
  before = fileio.list_files(f"gs://{BUCKET}/ckpt")

  def fail(*_):
    raise convert.CheckpointError("verify failed: injected")

  with monkeypatch.context() as patch, pytest.raises(SystemExit) as e:
    patch.setattr(convert, "_logits_diff", fail)
    cli.main(["torch-to-jax", "from_local/run.pt", f"gs://{BUCKET}/ckpt/failed", "--verify"])
  assert e.value.code == 2

  # The connection drops in the middle of moving the upload into place: what was moved is
  # deleted again, and so is the upload.
  remote_fs, copies = fileio._remote_fs, []

  class Dropping:
    def __init__(self, fs):
      self.fs = fs

    def __getattr__(self, name):
      return getattr(self.fs, name)

    def copy(self, *args, **kwargs):
      copies.append(args)
      if len(copies) == 3:
        raise OSError("injected: the connection dropped")
      return self.fs.copy(*args, **kwargs)

  def dropping_fs(url):
    fs, root = remote_fs(url)
    return Dropping(fs), root

  with monkeypatch.context() as patch, pytest.raises(SystemExit) as e:
    patch.setattr(fileio, "_remote_fs", dropping_fs)
    cli.main(["torch-to-jax", "from_local/run.pt", f"gs://{BUCKET}/ckpt/dropped"])
  assert e.value.code == 2 and len(copies) == 3
  assert fileio.list_files(f"gs://{BUCKET}/ckpt") == before


@pytest.mark.slow
def test_tokenizer_directory_on_gs(gcs, tokenizer_dir):
  """TOKENIZER_DIR / --tokenizer on gs:// loads the released files like the local directory."""
  from geex_jax import fileio, tokenizer
  from geex_jax.errors import InputError

  if not (tokenizer_dir / "vocab.json").is_file():
    pytest.skip(f"no tokenizer files in {tokenizer_dir}")
  url = f"gs://{BUCKET}/codegeex_tokenizer"
  for name in ("vocab.json", "merges.txt", "added_tokens.json"):
    fileio.copy_file(tokenizer_dir / name, f"{url}/{name}")
  remote, local = tokenizer.as_tokenizer(url), tokenizer.load_tokenizer(tokenizer_dir)
  text = "def f(x):\n    return x  # four spaces\n"
  assert remote.directory == url and remote.vocab_size == local.vocab_size
  assert remote.encode(text) == local.encode(text) and remote.decode(local.encode(text)) == text
  with pytest.raises(InputError, match="does not exist"):
    tokenizer.load_tokenizer(f"gs://{BUCKET}/no_tokenizer_here")


def test_metrics_log_drops_steps_past_the_restored_one(tmp_path):
  """A resumed run's log: lines of steps after the restored checkpoint, and a torn last line,
  are dropped (the file rewritten whole); the rest is kept as it was."""
  from geex_jax import fileio
  from geex_jax.training import metrics as train_metrics

  path = tmp_path / train_metrics.METRICS_FILE
  path.write_text(
    "".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in range(1, 9)) + '{"step": 9, "lo'
  )
  log = train_metrics.MetricsLog(fileio.as_path(path), start=6)
  log.write({"step": 7, "loss": 0.25})
  log.close()
  steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
  assert steps == [1, 2, 3, 4, 5, 6, 7]
  assert json.loads(path.read_text().splitlines()[-1])["loss"] == 0.25
  assert sorted(p.name for p in tmp_path.iterdir()) == [train_metrics.METRICS_FILE]  # no temp files
  untouched = path.read_text()
  train_metrics.MetricsLog(fileio.as_path(path), start=7).close()
  assert path.read_text() == untouched


@pytest.mark.slow
def test_beam_build_from_gs_sources_into_gs(gcs, runs, monkeypatch):
  """`geex-data build --runner DirectRunner` with --src and --out on gs://: the same documents
  as the local in-process build of the same files, and TFDS opens the copy it wrote."""
  import tensorflow_datasets as tfds

  from geex_jax import fileio
  from geex_jax.data import tfds_corpus

  work = runs["work"]
  fileio.copy_tree(work / "src", f"gs://{BUCKET}/src")
  out = f"gs://{BUCKET}/corpus_beam"
  _run(
    gcs,
    work,
    "geex-data",
    "build",
    "--src",
    f"gs://{BUCKET}/src",
    "--out",
    out,
    "--runner",
    "DirectRunner",
    "--num-workers",
    "1",
    "--no-progress",
  )
  for k, v in gcs["env"].items():
    monkeypatch.setenv(k, v)
  fileio.copy_tree(out, work / "corpus_beam_copy")
  assert not any(p.startswith(".beam") for p in fileio.list_files(work / "corpus_beam_copy"))
  local = json.loads((work / "corpus" / "manifest.json").read_text())
  remote = json.loads((work / "corpus_beam_copy" / "manifest.json").read_text())
  assert remote["kept"] == local["kept"] and remote["dropped"] == local["dropped"]

  def texts(root, manifest):
    return sorted(
      tfds_corpus.DocumentReader([str(root / s) for s in manifest["languages"]["Python"]["shards"]])
    )

  assert texts(work / "corpus_beam_copy", remote) == texts(work / "corpus", local)
  builder = tfds.builder_from_directory(str(work / "corpus_beam_copy"))
  assert builder.info.splits["python"].num_examples == local["languages"]["Python"]["documents"]
