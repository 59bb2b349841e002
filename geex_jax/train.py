"""`geex-train`: the gin-configured, sharded (pjit) CodeGeeX trainer.

    geex-train --gin_file=gin_configs/models/tiny.gin --gin_file=gin_configs/runs/pretrain.gin \\
        --gin.MODEL_DIR="'/tmp/run'" --gin.CORPUS_DIR="'/tmp/corpus'"

One process per host. The train step is compiled once with explicit shardings: params and
optimizer state sharded by the model's logical axes (partitioning.LOGICAL_AXIS_RULES), the batch
split over data x fsdp, the state donated. Each host reads only its rows of the global batch.
Checkpoints (Orbax CheckpointManager, async) go to MODEL_DIR/checkpoints/<step>/{params,opt_state,
data_state}; a restarted run resumes from the latest one, bit-exactly (the data iterator state is
part of the checkpoint and the dropout key is a function of the step). MODEL_DIR (and INIT_FROM)
may be a local path or a gs:// URL (geex_jax.fileio.as_path).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import pathlib
import signal
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from geex_jax import batches as batches_lib  # noqa: F401  (registers the gin batch sources)
from geex_jax import checkpoints, fileio, optim, partitioning
from geex_jax.errors import CheckpointError, ConfigError, GeexError, cli_errors
from geex_jax.model import CodeGeeX, CodeGeeXConfig, init_params, param_logical_specs

PROG = "geex-train"
# gin_configs/: installed inside the package (geex_jax/gin_configs, see pyproject.toml), or the
# checkout's top-level folder (editable installs and running from the source tree).
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
GIN_DIR = next((d for d in (_PACKAGE_DIR / "gin_configs", _PACKAGE_DIR.parent / "gin_configs")
                if d.is_dir()), _PACKAGE_DIR.parent / "gin_configs")
METRICS_FILE = "metrics.jsonl"

# The model config is built from gin (`MODEL = @CodeGeeXConfig()` in gin_configs/models/base.gin).
gin.external_configurable(CodeGeeXConfig, "CodeGeeXConfig")


class TrainingDiverged(GeexError):
  """The loss became NaN or infinite."""


class TrainState(NamedTuple):
  step: jax.Array          # int32 scalar: optimizer updates applied so far
  params: Any              # fp32 master weights
  opt_state: Any


# ---------------------------------------------------------------------------------------------
# Peak FLOP/s per device (dense bf16, the usual MFU denominator). Matched as a substring of
# jax.Device.device_kind; `train.peak_flops_per_device` overrides (and is the only way on CPU).
PEAK_FLOPS = (
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v4", 275e12), ("TPU v3", 61.5e12),  # v3: per core (= JAX device)
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12),
    ("V100", 125e12),
)


def peak_flops(device: jax.Device, override: Optional[float] = None) -> Optional[float]:
  if override:
    return float(override)
  kind = getattr(device, "device_kind", "")
  for key, flops in PEAK_FLOPS:
    if key.lower() in kind.lower():
      return flops
  return None


def _check_token_range(batch: dict, vocab_size: int) -> None:
  """Out-of-range ids would be gathered silently (clamped) by the embedding: refuse them.

  Catches a tokenizer whose vocabulary is larger than the model's (e.g. the real tokenizer with
  the demo's 512-row table). A host-side max over one batch costs microseconds.
  """
  top = int(np.max(batch["decoder_input_tokens"], initial=0))
  top = max(top, int(np.max(batch["decoder_target_tokens"], initial=0)))
  if top >= vocab_size:
    raise ConfigError(f"the data has token id {top} but the model's vocabulary has {vocab_size} "
                      "rows: use a tokenizer that fits, or set VOCAB_SIZE (52224 for the "
                      "CodeGeeX tokenizer)")


# ---------------------------------------------------------------------------------------------
# The step.


def loss_fn(params: Any, batch: dict, config: CodeGeeXConfig, dropout_rng: jax.Array,
            total_weight: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of weighted token CE / total_weight, sum of weighted token CE) of one (micro)batch.

  Dividing by the whole batch's weight, not the microbatch's, makes the sum of microbatch
  gradients exactly the full batch's gradient.
  """
  deterministic = config.dropout_rate == 0.0
  logits = CodeGeeX(config).apply(
      {"params": params}, batch["decoder_input_tokens"], batch["decoder_positions"],
      batch["decoder_segment_ids"], deterministic=deterministic,
      rngs=None if deterministic else {"dropout": dropout_rng})
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["decoder_target_tokens"])
  loss_sum = jnp.sum(ce * batch["decoder_loss_weights"])
  return loss_sum / total_weight, loss_sum


def make_train_step(config: CodeGeeXConfig, optimizer: optax.GradientTransformation,
                    schedule: Callable[[Any], Any], *, microbatches: int = 1,
                    param_shardings: Any = None, microbatch_sharding: Any = None) -> Callable:
  """train_step(state, batch, rng) -> (state, metrics); batch arrays [batch, length].

  With microbatches > 1 the gradient is accumulated (fp32) over a lax.scan of microbatches and one
  optimizer update is applied: same update as the whole batch at once, 1/microbatches the
  activation memory.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    total_weight = jnp.maximum(jnp.sum(batch["decoder_loss_weights"]), 1.0)
    step_rng = jax.random.fold_in(rng, state.step)

    def micro(mb, i):
      (_, loss_sum), grads = grad_fn(state.params, mb, config, jax.random.fold_in(step_rng, i),
                                     total_weight)
      if param_shardings is not None:
        # Reduce-scatter the gradient to the params' layout right away (FSDP).
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
      return grads, loss_sum

    if microbatches == 1:
      grads, loss_sum = micro(batch, 0)
    else:
      def split(x):
        # Row j of microbatch i is row j * M + i: every microbatch is spread over all data
        # shards (a plain reshape would put microbatch 0 on the first shards only).
        b = x.shape[0]
        x = x.reshape(b // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
        if microbatch_sharding is not None:
          x = jax.lax.with_sharding_constraint(x, microbatch_sharding)
        return x
      mbs = jax.tree.map(split, batch)

      def body(carry, xs):
        acc, loss_acc = carry
        mb, i = xs
        grads, loss_sum = micro(mb, i)
        return (jax.tree.map(jnp.add, acc, grads), loss_acc + loss_sum), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      if param_shardings is not None:
        zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
      (grads, loss_sum), _ = jax.lax.scan(
          body, (zeros, jnp.zeros((), jnp.float32)), (mbs, jnp.arange(microbatches)))

    grad_norm = optim.global_norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # The new params' norm: a NaN that entered through the update shows up in this step's
    # metrics, before the state can be checkpointed (the loss would show it one step later).
    metrics = {"loss": loss_sum / total_weight, "grad_norm": grad_norm,
               "param_norm": optim.global_norm(params),
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
               "loss_tokens": total_weight}
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


# ---------------------------------------------------------------------------------------------
# Setup: mesh, shardings, state, data.


def _replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_shardings(config: CodeGeeXConfig, optimizer: optax.GradientTransformation, mesh
                    ) -> tuple[TrainState, TrainState]:
  """(abstract TrainState of ShapeDtypeStructs, TrainState of NamedShardings)."""
  param_sh = partitioning.logical_to_sharding(param_logical_specs(config), mesh)
  abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  opt_abstract = jax.eval_shape(optimizer.init, abstract)
  is_sharding = lambda x: isinstance(x, NamedSharding)  # noqa: E731
  # Moments take their parameter's sharding; counts and other scalars are replicated.
  opt_sh = optax.tree_map_params(optimizer, lambda _, s: s, opt_abstract, param_sh,
                                 transform_non_params=lambda _: _replicated(mesh),
                                 is_leaf=is_sharding)
  shardings = TrainState(_replicated(mesh), param_sh, opt_sh)
  shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract, opt_abstract)
  return shapes, shardings


def _abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def host_data_shard(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
  """(shard_index, num_shards) of this process's rows of the global batch under `sharding`.

  The rows a process feeds are the union of its devices' slices: one contiguous block. Hosts
  whose devices hold the same rows (a model axis spanning hosts) get the same shard index.
  """
  index_map = sharding.addressable_devices_indices_map((global_batch, 1))
  spans = {(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
           for s in index_map.values()}
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  covered = sum(b - a for a, b in spans)
  if covered != stop - start or global_batch % (stop - start):
    raise ConfigError(f"this host's rows of the batch are not one block ({sorted(spans)}); use "
                      "a mesh whose data/fsdp axes follow the host order")
  rows = stop - start
  return start // rows, global_batch // rows


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def _make_manager(model_dir, keep: int, async_save: bool):
  """model_dir: an epath.Path from fileio.as_path (absolute local, or gs://)."""
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(
      model_dir / checkpoints.CHECKPOINTS_SUBDIR, options=options,
      item_names=(checkpoints.PARAMS_ITEM, "opt_state", "data_state"))


def _close_manager(manager) -> None:
  """manager.close(), and also waiting for the stale-temp-directory cleanup it starts when
  created (close() does not: a run that fails right away would exit under that thread, which
  then prints a traceback). Orbax has no public call for that wait; without it, only the noise
  returns."""
  await_cleanup = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
  if await_cleanup is not None:
    await_cleanup()
  manager.close()


def _gather_data_states(state: dict) -> list[dict]:
  """Every process's data iterator state (each host reads different documents)."""
  if jax.process_count() == 1:
    return [state]
  from jax.experimental import multihost_utils
  raw = np.frombuffer(json.dumps(state).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.asarray([raw.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[: raw.size] = raw
  allraw = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(allraw[i][: int(lengths[i][0])]).decode())
          for i in range(jax.process_count())]


def _save(manager, state: TrainState, data_state: dict, step: int) -> None:
  import orbax.checkpoint as ocp
  states = _gather_data_states(data_state)
  manager.save(step, args=ocp.args.Composite(**{
      checkpoints.PARAMS_ITEM: ocp.args.StandardSave(state.params),
      "opt_state": ocp.args.StandardSave(state.opt_state),
      "data_state": ocp.args.JsonSave({"step": step, "process_count": len(states),
                                       "states": states}),
  }), force=True)


def _restore(manager, step: int, shapes: TrainState, shardings: TrainState
             ) -> tuple[TrainState, dict]:
  import orbax.checkpoint as ocp
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{
        checkpoints.PARAMS_ITEM: ocp.args.StandardRestore(
            _abstract_with_shardings(shapes.params, shardings.params)),
        "opt_state": ocp.args.StandardRestore(
            _abstract_with_shardings(shapes.opt_state, shardings.opt_state)),
        "data_state": ocp.args.JsonRestore(),
    }))
  except Exception as e:  # orbax raises many types for a damaged or mismatched checkpoint
    raise CheckpointError(f"cannot resume from step {step} in {manager.directory}: "
                          f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
  data = restored["data_state"]
  if data["process_count"] != jax.process_count():
    raise CheckpointError(f"checkpoint step {step} was written by {data['process_count']} "
                          f"processes; this run has {jax.process_count()} (data states differ)")
  step_arr = jax.device_put(jnp.asarray(step, jnp.int32), shardings.step)
  state = TrainState(step_arr, restored[checkpoints.PARAMS_ITEM], restored["opt_state"])
  return state, data["states"][jax.process_index()]


_SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size",
                 "max_position")


def _check_same_shape(config: CodeGeeXConfig, other: CodeGeeXConfig, where: str) -> None:
  diff = [f"{f}: {getattr(other, f)} there vs {getattr(config, f)} here" for f in _SHAPE_FIELDS
          if getattr(config, f) != getattr(other, f)]
  if diff:
    raise ConfigError(f"the model in {where} has another shape ({'; '.join(diff)})")


def _init_from(path: str, config: CodeGeeXConfig, shardings: Any) -> Any:
  """Params of a converted (params-only) or trained checkpoint, cast to the master dtype and
  placed with `shardings`."""
  stored = checkpoints.load_config(path)
  _check_same_shape(config, stored, path)
  dtype = config.weight_dtype
  if stored.scan_layers == config.scan_layers:
    # Same layout: each host restores only its shards.
    _, params = checkpoints.load_params(path, shardings=shardings)
    return jax.tree.map(lambda x, s: jax.device_put(x.astype(dtype), s), params, shardings)
  _, params = checkpoints.load_params(path, dtype=dtype, scan_layers=config.scan_layers)
  return jax.tree.map(jax.device_put, params, shardings)


# ---------------------------------------------------------------------------------------------
# Metrics output.


class _MetricsLog:
  """MODEL_DIR/metrics.jsonl: one JSON line per step, local or gs://.

  Opening it for a run that starts at step `start` drops the lines of later steps (a killed run
  logged steps past its last checkpoint; this run logs them again) and a line torn by a kill,
  rewriting the file whole, so that the log reads like one uninterrupted run. Locally the lines
  are then appended line-buffered (a killed run keeps every line it wrote). A gs:// object cannot
  be appended to: the lines go to a local copy, and the whole file is uploaded at every checkpoint
  (`sync(force=True)`), otherwise at most every `upload_every_s` seconds, and at the end; a kill
  loses at most the lines since the last upload, steps a resumed run logs again anyway.
  """

  def __init__(self, path, start: int, upload_every_s: float = 60.0):
    self.path, self.remote = path, fileio.is_url(path)
    self.upload_every_s = upload_every_s
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    kept = "".join(line + "\n" for line in _lines_up_to(text, start))
    if kept != text:
      fileio.write_atomic(path, kept)
    if self.remote:
      self._file = tempfile.NamedTemporaryFile("w+", encoding="utf-8", prefix="geex-metrics-",
                                               suffix=".jsonl", buffering=1)
      self._file.write(kept)
    else:
      self._file = open(path, "a", encoding="utf-8", buffering=1)
    self._dirty, self._uploaded = False, time.monotonic()

  def write(self, record: dict) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._dirty = True
    self.sync()

  def sync(self, force: bool = False) -> None:
    """Uploads the whole log (gs:// only) if lines were added and `force` or it is time."""
    if not (self.remote and self._dirty):
      return
    if not force and time.monotonic() - self._uploaded < self.upload_every_s:
      return
    self._file.flush()
    self._file.seek(0)
    text = self._file.read()
    fileio.write_atomic(self.path, text)
    self._dirty, self._uploaded = False, time.monotonic()

  def close(self) -> None:
    try:
      self.sync(force=True)
    finally:
      self._file.close()


def _lines_up_to(text: str, start: int) -> list[str]:
  """The lines of a metrics log that a run resuming at step `start` keeps: no step > start, no
  blank or torn (unparseable) line."""
  kept = []
  for line in text.splitlines():
    try:
      rec = json.loads(line)
    except ValueError:  # blank, or torn by a kill
      continue
    step = rec.get("step") if isinstance(rec, dict) else None
    if isinstance(step, int) and step > start:
      continue
    kept.append(line)
  return kept


class _Reporter:
  """Console progress bar, TensorBoard events and MODEL_DIR/metrics.jsonl (process 0 only)."""

  def __init__(self, model_dir, start: int, total: int, enabled: bool,
               progress: bool, tensorboard: bool):
    self.enabled = enabled
    self.bar = self.tb = self.jsonl = None
    if not enabled:
      return
    self.jsonl = _MetricsLog(model_dir / METRICS_FILE, start)
    if tensorboard:
      from tensorboardX import SummaryWriter
      # tensorboardX writes gs:// itself (google-cloud-storage), as MaxText's writer does.
      self.tb = SummaryWriter(os.fspath(model_dir / "tensorboard"))
    if progress:
      from tqdm import tqdm
      # Into a log file (not a terminal) a redraw every 0.1 s is noise: every 30 s there.
      self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                      file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 30.0)

  def step(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    self.jsonl.write({"step": step, **metrics})
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(f"train/{k}", v, step)
    if self.bar is not None:
      self.bar.update(step - self.bar.n)
      shown = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['learning_rate']:.2e}"}
      if "tokens_per_s" in metrics:
        shown["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
      if "mfu" in metrics:
        shown["mfu"] = f"{metrics['mfu']:.1%}"
      self.bar.set_postfix(shown, refresh=False)

  def checkpointed(self) -> None:
    """A checkpoint was saved: bring the remote metrics log up to date."""
    if self.jsonl is not None:
      self.jsonl.sync(force=True)

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    if self.bar is not None:
      self.bar.write(text, file=sys.stderr)
    else:
      print(text, file=sys.stderr)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()
    if self.tb is not None:
      self.tb.close()
    if self.jsonl is not None:
      self.jsonl.close()


def read_metrics(model_dir: os.PathLike) -> dict[int, dict]:
  """{step: metrics} from MODEL_DIR/metrics.jsonl; a step logged twice (re-run after a resume)
  keeps its last record."""
  out = {}
  path = fileio.as_path(model_dir) / METRICS_FILE
  if path.exists():
    for line in path.read_text().splitlines():
      try:
        rec = json.loads(line)
      except ValueError:  # blank, or torn by a kill
        continue
      out[rec["step"]] = rec
  return out


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int
  losses: dict[int, float]      # step (1-based: after that many updates) -> loss of that step
  status: str                   # "done" | "preempted"


class _Preemption:
  """SIGTERM -> save and exit at the next step boundary. Multi-host runs agree on the step via
  the distributed runtime's preemption sync point."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if jax.process_count() == 1:
      try:
        self._old = signal.signal(signal.SIGTERM, self._handler)
      except ValueError:  # not the main thread (embedded use): no handler
        self._old = None
    return self

  def _handler(self, signum, frame):
    self.requested = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # preemption service off
        return False
    return self.requested

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _check_required(**values) -> None:
  missing = [k for k, v in values.items() if v is gin.REQUIRED]
  if missing:
    raise ConfigError(f"gin value(s) required but not set: {', '.join('train.' + m for m in missing)}"
                      " (e.g. --gin.MODEL_DIR=\"'/path'\")")


@gin.configurable
def train(*, model_dir: str = gin.REQUIRED, model: CodeGeeXConfig = gin.REQUIRED,
          data_source: Callable[..., Any] = gin.REQUIRED, batch_size: int = gin.REQUIRED,
          sequence_length: int = gin.REQUIRED, num_steps: int = gin.REQUIRED,
          microbatches: int = 1, mesh_shape: Sequence[int] = (-1, 1, 1),
          num_devices: Optional[int] = None, seed: int = 0, data_seed: Optional[int] = None,
          checkpoint_every: int = 1000, keep_checkpoints: int = 3, async_checkpointing: bool = True,
          init_from: Optional[str] = None, optimizer: Optional[optax.GradientTransformation] = None,
          peak_flops_per_device: Optional[float] = None, progress: bool = True,
          tensorboard: bool = True, stop_at_step: Optional[int] = None) -> TrainResult:
  """Trains `model` for `num_steps` optimizer steps, resuming from MODEL_DIR if it has a checkpoint.

  Args:
    model_dir: run directory (config.json, checkpoints/, tensorboard/, metrics.jsonl).
    model: the CodeGeeXConfig (built from gin: gin_configs/models/*.gin).
    data_source: a batch source factory (geex_jax.batches), e.g. @pipeline_batches.
    batch_size, sequence_length: global rows per step and tokens per row.
    num_steps: total optimizer steps of the run.
    microbatches: gradient accumulation; batch_size / microbatches rows per forward/backward.
    mesh_shape: (data, fsdp, model) device counts, -1 = the rest.
    num_devices: use only the first N devices (tests/benchmarks); None = all.
    seed: parameter init and dropout; data_seed: the data order (default: seed).
    checkpoint_every: save every N steps (and at the end); keep_checkpoints: how many to keep.
    init_from: a converted/trained checkpoint to take the params from when MODEL_DIR has none.
    optimizer: an optax transformation; None = optim.make_optimizer() as bound in gin.
    peak_flops_per_device: MFU denominator override (needed on CPU).
    stop_at_step: stop (with a checkpoint) at this step although the schedule runs to num_steps.
  """
  _check_required(model_dir=model_dir, model=model, data_source=data_source,
                  batch_size=batch_size, sequence_length=sequence_length, num_steps=num_steps)
  config: CodeGeeXConfig = model
  if sequence_length > config.max_position:
    raise ConfigError(f"sequence_length {sequence_length} exceeds the model's max_position "
                      f"{config.max_position}")
  if microbatches < 1 or batch_size % microbatches:
    raise ConfigError(f"batch_size {batch_size} is not divisible by microbatches {microbatches}")
  model_dir = fileio.as_path(model_dir)  # absolute local path, or gs:// as given

  devices = jax.devices() if num_devices is None else jax.devices()[:num_devices]
  try:
    mesh = partitioning.make_mesh(*mesh_shape, devices=devices)
  except ValueError as e:
    raise ConfigError(f"train.mesh_shape: {e}") from None
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if (batch_size // microbatches) % data_parallel:
    raise ConfigError(f"batch_size / microbatches = {batch_size // microbatches} rows is not "
                      f"divisible by data x fsdp = {data_parallel} devices")

  schedule = optim.learning_rate_schedule()
  if optimizer is None:
    optimizer = optim.make_optimizer(learning_rate=schedule)
  shapes, shardings = state_shardings(config, optimizer, mesh)
  batch_sh = partitioning.batch_sharding(mesh)
  micro_sh = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
  rng = jax.device_put(jax.random.PRNGKey(seed), _replicated(mesh))

  with partitioning.mesh_context(mesh):
    step_fn = jax.jit(
        make_train_step(config, optimizer, schedule, microbatches=microbatches,
                        param_shardings=shardings.params, microbatch_sharding=micro_sh),
        in_shardings=(shardings, batch_sh, _replicated(mesh)),
        out_shardings=(shardings, _replicated(mesh)), donate_argnums=(0,))

  # Data: this host's rows of each global batch.
  shard_index, num_shards = host_data_shard(batch_sh, batch_size)
  source = data_source(batch_size=batch_size, sequence_length=sequence_length,
                       seed=seed if data_seed is None else data_seed, shard_index=shard_index,
                       num_shards=num_shards)

  # State: resume > init_from > random init.
  is_main = jax.process_index() == 0
  manager = _make_manager(model_dir, keep_checkpoints, async_checkpointing)
  try:
    start = manager.latest_step()
    if start is not None:
      _check_same_shape(config, checkpoints.load_config(model_dir), str(model_dir))
      state, data_state = _restore(manager, start, shapes, shardings)
      source.set_state(data_state)
      how = f"resumed from step {start}"
    else:
      start = 0
      if init_from:
        params = _init_from(init_from, config, shardings.params)
        how = f"params from {init_from}"
      else:
        params = jax.jit(lambda r: init_params(config, r), out_shardings=shardings.params)(
            jax.random.PRNGKey(seed))
        how = "random init"
      opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
      state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params,
                         opt_state)
    if is_main:
      checkpoints.save_config(model_dir, config)
  except BaseException:
    _close_manager(manager)  # a bad INIT_FROM or checkpoint: end Orbax's threads, then report
    raise
  data_state = source.get_state()

  end = num_steps if stop_at_step is None else min(num_steps, stop_at_step)
  tokens_per_step = batch_size * sequence_length
  flops_per_step = config.flops_per_token(sequence_length) * tokens_per_step
  peak = peak_flops(devices[0], peak_flops_per_device)
  reporter = _Reporter(model_dir, start, end, is_main, progress, tensorboard)
  reporter.message(f"{PROG}: {config.num_params() / 1e6:.1f}M params, mesh "
                   f"{dict(mesh.shape)}, batch {batch_size}x{sequence_length}"
                   f"{f' in {microbatches} microbatches' if microbatches > 1 else ''}, steps "
                   f"{start}->{end}; {how}")

  losses: dict[int, float] = {}
  last_saved = start
  timer = {"t": None, "step": start}

  def finish(step: int, metrics: Any) -> None:
    """Host side of a finished step: NaN check, throughput, logging."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm", "param_norm")):
      good = manager.latest_step()
      manager.wait_until_finished()
      raise TrainingDiverged(
          f"training diverged at step {step} (loss {values['loss']}, grad norm "
          f"{values['grad_norm']}, param norm {values['param_norm']}); stopping. The last good "
          "checkpoint "
          + (f"(step {good}) is kept in {model_dir / checkpoints.CHECKPOINTS_SUBDIR}"
             if good is not None else "does not exist (none was saved yet)"))
    now = time.perf_counter()
    # The first step includes compilation: throughput counts from its end.
    if timer["t"] is not None and step > timer["step"]:
      dt = (now - timer["t"]) / (step - timer["step"])
      values["step_time_s"] = dt
      values["tokens_per_s"] = tokens_per_step / dt
      if peak:
        values["mfu"] = flops_per_step / dt / (peak * len(devices))
    timer["t"], timer["step"] = now, step
    values["perplexity"] = math.exp(min(values["loss"], 50.0))
    losses[step] = values["loss"]
    reporter.step(step, values)

  status = "done"
  pending = None  # (step, device metrics): fetched one step late so the host never stalls dispatch
  try:
    with _Preemption() as preemption, partitioning.mesh_context(mesh):
      for step in range(start, end):
        if preemption.reached(step):
          status = "preempted"
          break
        try:
          local = next(source)
        except StopIteration:
          reporter.message(f"{PROG}: the data ran out at step {step}")
          break
        data_state = source.get_state()
        _check_token_range(local, config.vocab_size)
        batch = {k: jax.make_array_from_process_local_data(batch_sh, np.asarray(v),
                                                           (batch_size, sequence_length))
                 for k, v in local.items()}
        state, metrics = step_fn(state, batch, rng)
        if pending is not None:
          finish(*pending)
        pending = (step + 1, metrics)
        if (step + 1) % checkpoint_every == 0:
          finish(*pending)  # never checkpoint a diverged state
          pending = None
          _save(manager, state, data_state, step + 1)
          reporter.checkpointed()
          last_saved = step + 1
      if pending is not None:
        finish(*pending)
      final_step = int(jax.device_get(state.step))
      if final_step != last_saved:
        _save(manager, state, data_state, final_step)
      manager.wait_until_finished()
  except BaseException:
    _close_manager(manager)  # its background threads must end before the interpreter does
    raise
  finally:
    reporter.close()
  if status == "preempted":
    reporter.message(f"{PROG}: preempted; checkpoint saved at step {final_step}")
  manager.close()
  return TrainResult(state=state, step=final_step, losses=losses, status=status)


# ---------------------------------------------------------------------------------------------
# Command line.


def _parse_args(argv: Optional[Sequence[str]]):
  parser = argparse.ArgumentParser(
      prog=PROG, description="Train CodeGeeX (gin-configured). Bindings: --gin.KEY=VALUE, e.g. "
      "--gin.MODEL_DIR=\"'/tmp/run'\" --gin.train.num_steps=1000")
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable; relative paths also searched in gin_configs/)")
  parser.add_argument("--gin_search_path", action="append", default=[],
                      help="extra directories for gin files and includes")
  parser.add_argument("--init_from", default=None,
                      help="shorthand for --gin.train.init_from: params-only checkpoint to start "
                      "from (fine-tuning)")
  dist = parser.add_argument_group("multi-host (one process per host)")
  dist.add_argument("--coordinator_address", default=os.environ.get("GEEX_COORDINATOR_ADDRESS"),
                    help="host:port of process 0 [$GEEX_COORDINATOR_ADDRESS]")
  dist.add_argument("--num_processes", type=int,
                    default=_env_int("GEEX_NUM_PROCESSES"), help="[$GEEX_NUM_PROCESSES]")
  dist.add_argument("--process_id", type=int, default=_env_int("GEEX_PROCESS_ID"),
                    help="[$GEEX_PROCESS_ID]")
  dist.add_argument("--distributed", action="store_true",
                    help="call jax.distributed.initialize() with cluster auto-detection "
                    "(TPU pod slices, SLURM) when no coordinator is given")
  args, rest = parser.parse_known_args(argv)
  bindings, unknown = [], []
  for arg in rest:
    if arg.startswith("--gin."):
      key, sep, value = arg[len("--gin."):].partition("=")
      if not sep:
        parser.error(f"{arg}: expected --gin.KEY=VALUE")
      bindings.append(f"{key} = {value}")
    else:
      unknown.append(arg)
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)}")
  if args.init_from:
    bindings.append(f"train.init_from = {args.init_from!r}")
  return args, bindings


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name)
  return int(value) if value else None


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None, process_id: Optional[int] = None,
                           auto: bool = False) -> None:
  """jax.distributed.initialize from explicit values, or auto-detected with `auto`."""
  if not (coordinator_address or auto):
    return
  if (os.environ.get("JAX_PLATFORMS", "").startswith("cpu")
      or os.environ.get("JAX_PLATFORM_NAME") == "cpu"):
    # Cross-process CPU collectives (tests, CPU clusters) need gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if coordinator_address:
      if num_processes is None or process_id is None:
        raise ConfigError("--coordinator_address needs --num_processes and --process_id")
      jax.distributed.initialize(coordinator_address, num_processes, process_id)
    else:
      jax.distributed.initialize()
  except (RuntimeError, ValueError) as e:
    raise ConfigError(f"jax.distributed.initialize failed: {str(e).splitlines()[0]}") from None


def parse_gin(files: Sequence[str], bindings: Sequence[str],
              search_paths: Sequence[str] = ()) -> None:
  """Parses gin files/bindings; any gin error becomes one ConfigError line."""
  for path in (*search_paths, GIN_DIR):
    if os.path.isdir(path):
      gin.add_config_file_search_path(os.fspath(path))
  resolved = []
  for f in files:
    if not os.path.exists(f) and (GIN_DIR / f).exists():
      f = os.fspath(GIN_DIR / f)
    resolved.append(f)
  # gin logs an ERROR for every search path an include is not found in before it finds it.
  quiet = logging.Filter()
  quiet.filter = lambda record: not record.getMessage().startswith("Path not found")
  logging.getLogger().addFilter(quiet)
  try:
    gin.parse_config_files_and_bindings(resolved, bindings)
  except Exception as e:  # gin raises ValueError, OSError, TokenError, SyntaxError, ...
    raise ConfigError("gin: " + " | ".join(
        line.strip() for line in str(e).splitlines() if line.strip())) from None
  finally:
    logging.getLogger().removeFilter(quiet)


def _unwrapped_type(error: Exception) -> type:
  """The class of `error` before gin wrapped it. gin re-raises an exception from a configurable
  as an instance of a local subclass (`ExceptionProxy`) whose __init__ takes no message."""
  cls = type(error)
  while "augment_exception_message" in getattr(cls.__init__, "__qualname__", ""):
    cls = cls.__mro__[1]
  return cls


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, bindings = _parse_args(argv)
  with cli_errors(PROG):
    if not args.gin_file:
      raise ConfigError("no --gin_file given (e.g. --gin_file=models/tiny.gin "
                        "--gin_file=runs/pretrain.gin)")
    initialize_distributed(args.coordinator_address, args.num_processes, args.process_id,
                           args.distributed)
    parse_gin(args.gin_file, bindings, args.gin_search_path)
    try:
      result = train()
    except GeexError as e:
      # gin appends "In call to configurable ..." lines: keep the user's line only.
      raise _unwrapped_type(e)(str(e).splitlines()[0]) from None
    except (TypeError, ValueError, RuntimeError) as e:
      if "configurable" in str(e) or "Required bindings" in str(e):
        raise ConfigError("gin: " + str(e).splitlines()[0]) from None
      raise
    if result.status == "preempted":
      return 143  # 128 + SIGTERM: the scheduler should restart (it resumes from the checkpoint)
  return 0


if __name__ == "__main__":
  sys.exit(main())
