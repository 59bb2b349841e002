"""The periodic actions of the training loop, each one object with one job: save a checkpoint,
evaluate on held-out batches, trace a profile. The loop asks each hook whether it is due after a
step; due hooks first `measure` (values merged into that step's metrics record), then, once the
step's metrics have passed the divergence check, `act`. `finish` runs once at the end."""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from geex_jax.model import partitioning
from geex_jax.training import checkpointing
from geex_jax.training.state import global_batch
from geex_jax.training.step import TrainState, loss_fn


class Hook:
  """Base class: a hook that is never due and does nothing."""

  def due(self, step: int) -> bool:
    return False

  def measure(self, step: int, state: TrainState) -> dict:
    """Values for the metrics record of `step` (called before the divergence check)."""
    return {}

  def act(self, step: int, state: TrainState, data_state: dict) -> None:
    """The action at a due step whose metrics are finite."""

  def finish(self, step: int, state: TrainState, data_state: dict) -> None:
    """At the end of the loop (done, preempted, or the data ran out)."""


class CheckpointHook(Hook):
  """Saves the train state with the data state every `every` steps and at the end."""

  def __init__(self, manager, every: int, start: int, on_saved: Callable[[], None] = lambda: None):
    self.manager, self.every, self.last_saved, self.on_saved = manager, every, start, on_saved

  def due(self, step: int) -> bool:
    return step % self.every == 0

  def act(self, step: int, state: TrainState, data_state: dict) -> None:
    checkpointing.save(self.manager, state, data_state, step)
    self.last_saved = step
    self.on_saved()

  def finish(self, step: int, state: TrainState, data_state: dict) -> None:
    if step != self.last_saved:
      self.act(step, state, data_state)
    self.manager.wait_until_finished()


class EvalHook(Hook):
  """Every `every` steps: the mean token loss of the params on `num_batches` batches of a
  held-out source (the same batches each time: the source is rewound to its first state), as
  `eval_loss` and `eval_perplexity` in the step's record."""

  def __init__(
    self,
    source,
    *,
    every: int,
    num_batches: int,
    config,
    setup,
    batch_size: int,
    sequence_length: int,
  ):
    self.source, self.every, self.num_batches = source, every, num_batches
    self.first_state = source.get_state()
    self.shape = (batch_size, sequence_length)
    self.setup = setup
    rep = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())

    def sums(params, batch):
      _, loss_sum = loss_fn(params, batch, config, jax.random.PRNGKey(0), jnp.float32(1.0))
      return loss_sum, jnp.sum(batch["decoder_loss_weights"])

    self._sums = jax.jit(
      sums, in_shardings=(setup.shardings.params, setup.batch_sharding), out_shardings=(rep, rep)
    )

  def due(self, step: int) -> bool:
    return step % self.every == 0

  def measure(self, step: int, state: TrainState) -> dict:
    self.source.set_state(self.first_state)
    total = weight = 0.0
    with partitioning.mesh_context(self.setup.mesh):
      for _ in range(self.num_batches):
        try:
          local = next(self.source)
        except StopIteration:
          break
        batch = global_batch(self.setup, local, self.shape)
        s, w = jax.device_get(self._sums(state.params, batch))
        total, weight = total + float(s), weight + float(w)
    loss = total / max(weight, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": weight}


class ProfilerHook(Hook):
  """A jax.profiler trace of steps (start, start + num_steps] into `directory` (TensorBoard's
  profile plugin and Perfetto read it)."""

  def __init__(self, directory, *, start: int, num_steps: int):
    self.directory, self.start, self.stop = directory, start, start + num_steps
    self.tracing = False

  def due(self, step: int) -> bool:
    return step in (self.start, self.stop)

  def act(self, step: int, state: TrainState, data_state: dict) -> None:
    if step == self.start and not self.tracing:
      jax.profiler.start_trace(os.fspath(self.directory))
      self.tracing = True
    elif step == self.stop and self.tracing:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.tracing = False

  def finish(self, step: int, state: TrainState, data_state: dict) -> None:
    if self.tracing:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.tracing = False


def due_hooks(hooks: list[Hook], step: int) -> list[Hook]:
  return [h for h in hooks if h.due(step)]


def measure_all(hooks: list[Hook], step: int, state: TrainState) -> dict:
  values: dict[str, Any] = {}
  for h in hooks:
    values.update(h.measure(step, state))
  return values
