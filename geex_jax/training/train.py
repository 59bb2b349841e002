"""The gin-configured, sharded (pjit) training loop: `train`, as `geex-train` runs it.

One process per host. The step is compiled once with explicit shardings (training.state): params
and optimizer state sharded by the model's logical axes (partitioning's rules, overridable in
gin), the batch split over data x fsdp, the state donated. Each host reads only its rows of the
global batch. The periodic actions are hooks (training.hooks): checkpoints (Orbax, async) to
MODEL_DIR/checkpoints/<step>/{params,opt_state,data_state}, held-out evaluation, a profiler
trace. A restarted run resumes from the latest checkpoint bit-exactly (the data iterator state is
part of it and the dropout key is a function of the step), after checking its bindings against
MODEL_DIR/config.gin (training.run_config). MODEL_DIR (and INIT_FROM) may be a local path or a
gs:// URL (geex_jax.fileio.as_path).
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from typing import Any, Callable, Optional, Sequence

import gin
import jax
import optax

from geex_jax import fileio
from geex_jax.errors import ConfigError, GeexError
from geex_jax.model import checkpoints, partitioning
from geex_jax.model.codegeex import CodeGeeXConfig
from geex_jax.training import checkpointing, hooks as hooks_lib, metrics as metrics_lib, optim
from geex_jax.training import run_config, state as state_lib
from geex_jax.training.step import TrainState, check_token_range

PROG = "geex-train"

# The model config is built from gin (`MODEL = @CodeGeeXConfig()` in gin_configs/models/base.gin).
gin.external_configurable(CodeGeeXConfig, "CodeGeeXConfig")


class TrainingDiverged(GeexError):
  """The loss became NaN or infinite."""


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int
  losses: dict[int, float]  # step (1-based: after that many updates) -> loss of that step
  status: str  # "done" | "preempted"


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
    raise ConfigError(
      f"gin value(s) required but not set: {', '.join('train.' + m for m in missing)}"
      " (e.g. --gin.MODEL_DIR=\"'/path'\")"
    )


@gin.configurable
def train(
  *,
  model_dir: str = gin.REQUIRED,
  model: CodeGeeXConfig = gin.REQUIRED,
  data_source: Callable[..., Any] = gin.REQUIRED,
  batch_size: int = gin.REQUIRED,
  sequence_length: int = gin.REQUIRED,
  num_steps: int = gin.REQUIRED,
  microbatches: int = 1,
  mesh_shape: Sequence[int] = (-1, 1, 1),
  num_devices: Optional[int] = None,
  seed: int = 0,
  data_seed: Optional[int] = None,
  checkpoint_every: int = 1000,
  keep_checkpoints: int = 3,
  async_checkpointing: bool = True,
  init_from: Optional[str] = None,
  optimizer: Optional[optax.GradientTransformation] = None,
  peak_flops_per_device: Optional[float] = None,
  progress: bool = True,
  tensorboard: bool = True,
  stop_at_step: Optional[int] = None,
  allow_config_change: bool = False,
  eval_source: Optional[Callable[..., Any]] = None,
  eval_every: int = 0,
  eval_batches: int = 4,
  profile_start_step: Optional[int] = None,
  profile_steps: int = 5,
) -> TrainResult:
  """Trains `model` for `num_steps` optimizer steps, resuming from MODEL_DIR if it has a checkpoint.

  Args:
    model_dir: run directory (config.json, checkpoints/, tensorboard/, metrics.jsonl).
    model: the CodeGeeXConfig (built from gin: gin_configs/models/*.gin).
    data_source: a batch source factory (geex_jax.data.batches), e.g. @pipeline_batches.
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
    allow_config_change: resume although the bindings differ from MODEL_DIR/config.gin.
    eval_source: a batch source factory like data_source, or one returning {name: source}
      (e.g. @heldout_batches: a held-out source per language); with eval_every > 0, up to
      `eval_batches` batches of each source are scored every `eval_every` steps (eval_loss, and
      eval_loss/<name> per named source). It is opened only when this run reaches an eval step.
    profile_start_step, profile_steps: trace steps (start, start + n] into MODEL_DIR/profile.
  """
  _check_required(
    model_dir=model_dir,
    model=model,
    data_source=data_source,
    batch_size=batch_size,
    sequence_length=sequence_length,
    num_steps=num_steps,
  )
  config: CodeGeeXConfig = model
  if sequence_length > config.max_position:
    raise ConfigError(
      f"sequence_length {sequence_length} exceeds the model's max_position {config.max_position}"
    )
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
    raise ConfigError(
      f"batch_size / microbatches = {batch_size // microbatches} rows is not "
      f"divisible by data x fsdp = {data_parallel} devices"
    )

  schedule = optim.learning_rate_schedule()
  if optimizer is None:
    optimizer = optim.make_optimizer(learning_rate=schedule)
  setup = state_lib.build_state(config, mesh, optimizer, schedule, microbatches=microbatches)
  rng = jax.device_put(jax.random.PRNGKey(seed), state_lib.replicated(mesh))

  # Data: this host's rows of each global batch.
  shard_index, num_shards = state_lib.host_data_shard(setup.batch_sharding, batch_size)
  source_args = dict(
    batch_size=batch_size,
    sequence_length=sequence_length,
    seed=seed if data_seed is None else data_seed,
    shard_index=shard_index,
    num_shards=num_shards,
  )
  source = data_source(**source_args)

  # State: resume > init_from > random init.
  is_main = jax.process_index() == 0
  manager = checkpointing.make_manager(model_dir, keep_checkpoints, async_checkpointing)
  try:
    start = manager.latest_step()
    if start is not None:
      state_lib.check_same_shape(config, checkpoints.load_config(model_dir), str(model_dir))
      config_note = run_config.record(
        model_dir, resuming=True, allow_change=allow_config_change, write=is_main
      )
      state, data_state = checkpointing.restore(manager, start, setup.shapes, setup.shardings)
      source.set_state(data_state)
      how = f"resumed from step {start}"
    else:
      start = 0
      config_note = run_config.record(model_dir, resuming=False, allow_change=True, write=is_main)
      state, how = state_lib.initial_state(setup, config, seed=seed, init_from=init_from)
    if is_main:
      checkpoints.save_config(model_dir, config)
    evaluator = None
    end = num_steps if stop_at_step is None else min(num_steps, stop_at_step)
    if eval_every > 0 and eval_source is None:
      raise ConfigError("train.eval_every is set but train.eval_source is not")
    # A run that reaches no eval step does not open the held-out data (a short run of
    # runs/pretrain.gin on synthetic data has no held-out corpus).
    if eval_every > 0 and end // eval_every > start // eval_every:
      if eval_batches < 1:
        raise ConfigError(f"train.eval_batches must be >= 1, got {eval_batches}")
      evaluator = hooks_lib.EvalHook(
        eval_source(**source_args),
        every=eval_every,
        num_batches=eval_batches,
        config=config,
        setup=setup,
        batch_size=batch_size,
        sequence_length=sequence_length,
      )
  except BaseException:
    checkpointing.close_manager(manager)  # a bad INIT_FROM or checkpoint: end Orbax's threads
    raise

  tokens_per_step = batch_size * sequence_length
  flops_per_step = config.flops_per_token(sequence_length) * tokens_per_step
  peak = metrics_lib.peak_flops(devices[0], peak_flops_per_device)
  reporter = metrics_lib.Reporter(model_dir, start, end, is_main, progress, tensorboard)
  if config_note:
    reporter.message(f"{PROG}: {config_note}")
  reporter.message(
    f"{PROG}: {config.num_params() / 1e6:.1f}M params, mesh "
    f"{dict(mesh.shape)}, batch {batch_size}x{sequence_length}"
    f"{f' in {microbatches} microbatches' if microbatches > 1 else ''}, steps "
    f"{start}->{end}; {how}"
  )
  checkpointer = hooks_lib.CheckpointHook(
    manager, checkpoint_every, start, on_saved=reporter.checkpointed
  )
  hooks: list[hooks_lib.Hook] = [checkpointer]
  if evaluator is not None:
    hooks.append(evaluator)
  if profile_start_step is not None:
    hooks.append(
      hooks_lib.ProfilerHook(
        model_dir / "profile", start=profile_start_step, num_steps=profile_steps
      )
    )

  losses: dict[int, float] = {}
  timer = {"t": None, "step": start}

  def finish(step: int, metrics: Any, extra: Optional[dict] = None) -> None:
    """Host side of a finished step: NaN check, throughput, logging."""
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not all(math.isfinite(values[k]) for k in ("loss", "grad_norm", "param_norm")):
      good = manager.latest_step()
      manager.wait_until_finished()
      raise TrainingDiverged(
        f"training diverged at step {step} (loss {values['loss']}, grad norm "
        f"{values['grad_norm']}, param norm {values['param_norm']}); stopping. The last good "
        "checkpoint "
        + (
          f"(step {good}) is kept in {model_dir / checkpoints.CHECKPOINTS_SUBDIR}"
          if good is not None
          else "does not exist (none was saved yet)"
        )
      )
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
    values.update(extra or {})
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
        check_token_range(local, config.vocab_size)
        batch = state_lib.global_batch(setup, local, (batch_size, sequence_length))
        state, metrics = setup.step_fn(state, batch, rng)
        if pending is not None:
          finish(*pending)
        pending = (step + 1, metrics)
        due = hooks_lib.due_hooks(hooks, step + 1)
        if due:
          # Due hooks measure, then the step passes the NaN check, then they act: a diverged
          # state is never checkpointed.
          finish(*pending, hooks_lib.measure_all(due, step + 1, state))
          pending = None
          # The source's state after this step's batch (asked only when a hook may save it:
          # a seqio source's state is a tf.data snapshot, too costly for every step).
          data_state = source.get_state()
          for hook in due:
            hook.act(step + 1, state, data_state)
      if pending is not None:
        finish(*pending)
      final_step = int(jax.device_get(state.step))
      data_state = source.get_state()
      for hook in hooks:
        hook.finish(final_step, state, data_state)
  except BaseException:
    checkpointing.close_manager(manager)  # its background threads must end before the interpreter
    raise
  finally:
    reporter.close()
  if status == "preempted":
    reporter.message(f"{PROG}: preempted; checkpoint saved at step {final_step}")
  manager.close()
  return TrainResult(state=state, step=final_step, losses=losses, status=status)
