"""Training batches from any registered seqio Task or Mixture (t5x style): `@seqio_batches`.

    geex-train ... --gin.train.data_source=@seqio_batches --gin.MIXTURE_OR_TASK_NAME="'codegeex'"
    # a user's own tasks: a module that registers them when imported
    --gin.MIXTURE_OR_TASK_MODULE="'my_project.tasks'" --gin.MIXTURE_OR_TASK_NAME="'my_mixture'"

When `corpus_dir` (CORPUS_DIR) is set, its tasks and the mixture `codegeex` are registered first
(pipeline.register_corpus_tasks). Rows come from `seqio.get_dataset` with this host's
`seqio.ShardInfo`, seeded shuffling, and `DecoderFeatureConverter(pack=True)`, fixed up to the
features pipeline.py produces: EOD as the first input of every segment, loss weight 0 on padding
and where the input is EOD, every feature 0 on padding.

What seqio's packing costs (pipeline.py packs without it): each document is truncated to the
sequence length before packing, so the tail of every longer document is lost (bench/data.py
measures how much).

Resume is bit-exact: the state holds a snapshot of the tf.data iterator (tf.train.Checkpoint:
shuffle buffers, mixture sampler, packer; zlib + base64 inside the JSON) and the number of
batches served since it. The trainer asks for the state only when it saves a checkpoint, so by
default (`snapshot_every=1`) each such call snapshots and a restore replays nothing; a caller that
asks every batch can set `snapshot_every=k` (serialising the buffers costs ~1 s) and have a
restore replay at most k - 1 batches. TensorFlow and seqio are imported only when a source is built.
"""

from __future__ import annotations

import base64
import importlib
import uuid
import zlib
from typing import Any, Iterator, Mapping, Optional

import gin
import numpy as np

from geex_jax.data.pipeline import FEATURES  # the step's feature names, one list for both sources
from geex_jax.errors import ConfigError

_STATE_VERSION = 1
_INT_FEATURES = tuple(f for f in FEATURES if f != "decoder_loss_weights")


def fix_up(batch: Mapping[str, np.ndarray], eos_id: int) -> dict[str, np.ndarray]:
  """seqio's packed decoder features -> pipeline.py's: int32 ids, 0 on padding, float32 loss
  weights that are 0 on padding and where the input is EOD (a segment start)."""
  real = np.asarray(batch["decoder_segment_ids"]) > 0
  out = {k: np.where(real, np.asarray(batch[k]), 0).astype(np.int32) for k in _INT_FEATURES}
  out["decoder_loss_weights"] = (real & (out["decoder_input_tokens"] != eos_id)).astype(np.float32)
  return out


def _tf():
  from geex_jax.data.tf_import import import_tf

  return import_tf()


class SeqioBatches:
  """Iterator of this host's rows (dicts of numpy arrays [rows, sequence_length]) of a tf.data
  dataset of batched seqio features, with a JSON-able `get_state()` / `set_state(state)`."""

  def __init__(self, dataset, *, eos_id: int, fingerprint: dict, snapshot_every: int = 1):
    if snapshot_every < 1:
      raise ConfigError(f"seqio_batches.snapshot_every must be >= 1, got {snapshot_every}")
    self.dataset = dataset
    self.eos_id = int(eos_id)
    self.snapshot_every = int(snapshot_every)
    self._fingerprint = fingerprint
    self._it = iter(dataset)
    self._served = 0
    self._snapshot: Optional[dict[str, str]] = None  # None = the fresh iterator
    self._snapshot_at = 0

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self._served += 1
    return fix_up({k: v.numpy() for k, v in batch.items()}, self.eos_id)

  def _write_snapshot(self) -> dict[str, str]:
    tf = _tf()
    root = f"ram://geex_seqio_{uuid.uuid4().hex}"
    try:
      prefix = tf.train.Checkpoint(iterator=self._it).write(f"{root}/it")
      files = {}
      for name in tf.io.gfile.listdir(root):
        with tf.io.gfile.GFile(f"{root}/{name}", "rb") as f:
          data = zlib.compress(f.read(), 1)
        files[name[len("it") :]] = base64.b64encode(data).decode("ascii")
      if prefix != f"{root}/it":
        raise RuntimeError(f"tf.train.Checkpoint wrote {prefix}, not {root}/it")
      return files
    finally:
      tf.io.gfile.rmtree(root)

  def _read_snapshot(self, files: Mapping[str, str]):
    tf = _tf()
    root = f"ram://geex_seqio_{uuid.uuid4().hex}"
    it = iter(self.dataset)
    try:
      tf.io.gfile.makedirs(root)
      for suffix, text in files.items():
        with tf.io.gfile.GFile(f"{root}/it{suffix}", "wb") as f:
          f.write(zlib.decompress(base64.b64decode(text)))
      tf.train.Checkpoint(iterator=it).read(f"{root}/it").assert_consumed()
    finally:
      tf.io.gfile.rmtree(root)
    return it

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: a snapshot of the tf.data iterator and the batches since."""
    if self._served - self._snapshot_at >= self.snapshot_every:
      self._snapshot, self._snapshot_at = self._write_snapshot(), self._served
    return {
      "version": _STATE_VERSION,
      "served": self._served,
      "snapshot_at": self._snapshot_at,
      "snapshot": self._snapshot,
      **self._fingerprint,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continue exactly after the batch at which `state` was taken."""
    if state.get("version") != _STATE_VERSION or "served" not in state:
      raise ConfigError(
        f"data iterator state (version {state.get('version')!r}) is not a seqio_batches state "
        f"(version {_STATE_VERSION}); was the run trained with another train.data_source?"
      )
    diff = [k for k, v in self._fingerprint.items() if state.get(k) != v]
    if diff:
      raise ConfigError(
        "data iterator state belongs to another data configuration (differs in "
        + ", ".join(f"{k}: saved {state.get(k)!r} vs now {self._fingerprint[k]!r}" for k in diff)
        + ")"
      )
    snapshot, at, served = state["snapshot"], int(state["snapshot_at"]), int(state["served"])
    it = iter(self.dataset) if snapshot is None else self._read_snapshot(snapshot)
    for _ in range(served - at):  # replay the batches served after the snapshot
      next(it)
    self._it, self._served = it, served
    self._snapshot, self._snapshot_at = snapshot, at


def _import_module(module: Optional[str]) -> None:
  if not module:
    return
  try:
    importlib.import_module(module)
  except ImportError as e:
    raise ConfigError(f"MIXTURE_OR_TASK_MODULE {module!r} cannot be imported: {e}") from None


def resolve(
  mixture_or_task_name: Optional[str],
  mixture_or_task_module: Optional[str] = None,
  corpus_dir: Optional[str] = None,
  tokenizer_dir: Optional[str] = None,
):
  """Registers what the bindings name (the corpus tasks, a user's module) and returns the seqio
  Task or Mixture."""
  if corpus_dir:
    from geex_jax.data import pipeline

    corpus_name = pipeline.register_corpus_tasks(
      corpus_dir, tokenizer_dir=tokenizer_dir, seqio_tasks=True
    )
    mixture_or_task_name = mixture_or_task_name or corpus_name
  _import_module(mixture_or_task_module)
  if not mixture_or_task_name:
    raise ConfigError(
      "seqio_batches needs MIXTURE_OR_TASK_NAME (a registered seqio Task or Mixture) or CORPUS_DIR"
    )
  import seqio

  try:
    return seqio.get_mixture_or_task(mixture_or_task_name)
  except ValueError:
    known = sorted({*seqio.MixtureRegistry.names(), *seqio.TaskRegistry.names()})
    shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "") if known else "none"
    raise ConfigError(
      f"unknown seqio mixture or task {mixture_or_task_name!r} (registered: {shown}); set "
      "MIXTURE_OR_TASK_MODULE to the module that registers it, or CORPUS_DIR for 'codegeex'"
    ) from None


def _eos_id(provider) -> int:
  if "targets" not in provider.output_features:
    raise ConfigError(f"seqio task {provider.name!r} has no 'targets' feature (a decoder-only LM)")
  vocab = provider.output_features["targets"].vocabulary
  eos = vocab.eos_id
  if eos is None:
    raise ConfigError(f"seqio task {provider.name!r}: its vocabulary has no EOS id")
  return int(eos)


def make_source(
  provider,
  *,
  split: str,
  batch_size: int,
  sequence_length: int,
  seed: int,
  shard_index: int,
  num_shards: int,
  shuffle: bool,
  num_epochs: Optional[int],
  snapshot_every: int,
) -> SeqioBatches:
  """A SeqioBatches over `split` of a seqio Task/Mixture: this host's batch_size // num_shards
  rows per batch (batch_size is the global batch)."""
  import seqio

  if batch_size % num_shards:
    raise ConfigError(f"batch size {batch_size} is not divisible by {num_shards} data shards")
  if not 0 <= shard_index < num_shards:
    raise ConfigError(f"shard_index {shard_index} is not in [0, num_shards={num_shards})")
  eos = _eos_id(provider)
  _tf()  # GPUs hidden from TensorFlow before seqio builds anything
  try:
    dataset = seqio.get_dataset(
      provider,
      {"targets": sequence_length},
      feature_converter=seqio.DecoderFeatureConverter(pack=True, bos_id=eos),
      dataset_split=split,
      shuffle=shuffle,
      num_epochs=num_epochs,
      shard_info=seqio.ShardInfo(shard_index, num_shards),
      seed=seed,
      batch_size=batch_size // num_shards,
      verbose=False,
    )
  except ValueError as e:
    raise ConfigError(f"seqio {provider.name!r} split {split!r}: {e}") from None
  fingerprint = {
    "mixture_or_task": provider.name,
    "split": split,
    "sequence_length": int(sequence_length),
    "rows": batch_size // num_shards,
    "seed": int(seed),
    "shard_index": int(shard_index),
    "num_shards": int(num_shards),
    "shuffle": bool(shuffle),
  }
  return SeqioBatches(dataset, eos_id=eos, fingerprint=fingerprint, snapshot_every=snapshot_every)


@gin.configurable
def seqio_batches(
  *,
  batch_size: int,
  sequence_length: int,
  seed: int,
  shard_index: int = 0,
  num_shards: int = 1,
  mixture_or_task_name: Optional[str] = None,
  mixture_or_task_module: Optional[str] = None,
  corpus_dir: Optional[str] = None,
  tokenizer_dir: Optional[str] = None,
  split: str = "train",
  shuffle: bool = True,
  num_epochs: Optional[int] = None,
  snapshot_every: int = 1,
) -> SeqioBatches:
  """Packed LM batches of a registered seqio Task/Mixture for the trainer (`train.data_source`).

  Args:
    batch_size, sequence_length, seed, shard_index, num_shards: from the trainer (batch_size is
      the global batch; this host gets batch_size // num_shards rows).
    mixture_or_task_name: MIXTURE_OR_TASK_NAME; None = the corpus mixture when corpus_dir is set.
    mixture_or_task_module: MIXTURE_OR_TASK_MODULE, imported first (it registers the user's tasks).
    corpus_dir, tokenizer_dir: CORPUS_DIR / TOKENIZER_DIR: register the corpus tasks ('codegeex').
    split: the seqio split; shuffle: seeded shuffling; num_epochs: None = repeat forever.
    snapshot_every: batches between iterator snapshots (restoring replays fewer than this).
  """
  provider = resolve(mixture_or_task_name, mixture_or_task_module, corpus_dir, tokenizer_dir)
  return make_source(
    provider,
    split=split,
    batch_size=batch_size,
    sequence_length=sequence_length,
    seed=seed,
    shard_index=shard_index,
    num_shards=num_shards,
    shuffle=shuffle,
    num_epochs=num_epochs,
    snapshot_every=snapshot_every,
  )


def _slug(task_name: str, mixture_name: str) -> str:
  prefix = mixture_name + "_"
  return task_name[len(prefix) :] if task_name.startswith(prefix) else task_name


@gin.configurable
def seqio_eval_batches(
  *,
  batch_size: int,
  sequence_length: int,
  seed: int,
  shard_index: int = 0,
  num_shards: int = 1,
  mixture_or_task_name: Optional[str] = None,
  mixture_or_task_module: Optional[str] = None,
  corpus_dir: Optional[str] = None,
  tokenizer_dir: Optional[str] = None,
  split: str = "validation",
) -> dict[str, SeqioBatches]:
  """{language slug: source} over `split` of each task of the mixture that has one (unshuffled,
  repeated, so every host always has batches), for `train.eval_source`."""
  provider = resolve(mixture_or_task_name, mixture_or_task_module, corpus_dir, tokenizer_dir)
  import seqio

  tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
  with_split = [t for t in tasks if split in t.splits]
  if not with_split:
    raise ConfigError(
      f"no task of seqio {provider.name!r} has a {split!r} split "
      f"(tasks: {', '.join(t.name for t in tasks)})"
    )
  return {
    _slug(t.name, provider.name): make_source(
      t,
      split=split,
      batch_size=batch_size,
      sequence_length=sequence_length,
      seed=seed,
      shard_index=shard_index,
      num_shards=num_shards,
      shuffle=False,
      num_epochs=None,
      snapshot_every=1,
    )
    for t in with_split
  }
