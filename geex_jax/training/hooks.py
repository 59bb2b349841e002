"""The periodic actions of the training loop, each one object with one job: save a checkpoint,
evaluate on held-out batches, trace a profile. The loop asks each hook whether it is due after a
step; due hooks first `measure` (values merged into that step's metrics record), then, once the
step's metrics have passed the divergence check, `act`. `finish` runs once at the end."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from geex_jax.model import partitioning
from geex_jax.training import checkpointing
from geex_jax.training.state import global_batch, host_data_shard
from geex_jax.training.step import TrainState, check_token_range, loss_fn


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
  """Every `every` steps: the mean token loss of the params on up to `num_batches` batches of each
  held-out source (the same batches each time: every source is rewound to its first state).

  `source` is one batch source, or {name: source} (e.g. `heldout_batches`: one per language).
  The step's record gets `eval_loss`, `eval_perplexity` and `eval_tokens` over all the sources
  (token-weighted), and with named sources also `eval_loss/<name>`, `eval_perplexity/<name>` and
  `eval_tokens/<name>`. A finite source may end before `num_batches`: the evaluation then scores
  the batches it has. With several hosts, one whose share of a source ends earlier feeds
  all-padding rows (no loss weight) until every host's share has ended, so the hosts keep
  computing the same global batches; the count found at the first evaluation is kept.
  """

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
    self.sources = dict(source) if isinstance(source, Mapping) else {None: source}
    if not self.sources:
      raise ValueError("EvalHook needs at least one source")
    self.every, self.num_batches = every, num_batches
    self.first_states = {name: s.get_state() for name, s in self.sources.items()}
    self.counts: dict[Optional[str], int] = {}  # batches per source, known after the first eval
    self.shape = (batch_size, sequence_length)
    _, num_shards = host_data_shard(setup.batch_sharding, batch_size)
    self.local_shape = (batch_size // num_shards, sequence_length)
    self.setup, self.vocab_size = setup, config.vocab_size
    rep = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())

    def sums(params, batch):
      _, loss_sum = loss_fn(params, batch, config, jax.random.PRNGKey(0), jnp.float32(1.0))
      return loss_sum, jnp.sum(batch["decoder_loss_weights"])

    self._sums = jax.jit(
      sums, in_shardings=(setup.shardings.params, setup.batch_sharding), out_shardings=(rep, rep)
    )

  def due(self, step: int) -> bool:
    return step % self.every == 0

  def _padding(self, like: Optional[dict]) -> dict:
    """A local batch of padding rows (segment 0, no loss weight)."""
    if like is not None:
      return {k: np.zeros_like(v) for k, v in like.items()}
    out = {
      k: np.zeros(self.local_shape, np.int32)
      for k in (
        "decoder_input_tokens",
        "decoder_target_tokens",
        "decoder_segment_ids",
        "decoder_positions",
      )
    }
    out["decoder_loss_weights"] = np.zeros(self.local_shape, np.float32)
    return out

  def _local_batches(self, name: Optional[str]) -> Iterator[dict]:
    """This host's batches of source `name` for one evaluation, from its first state."""
    source = self.sources[name]
    source.set_state(self.first_states[name])
    known = self.counts.get(name)
    like = None
    n = 0
    for _ in range(self.num_batches if known is None else known):
      local = next(source, None)
      if known is None and _all_hosts(local is None):
        break  # the first evaluation: every host's share has ended
      if local is None:
        local = self._padding(like)
      else:
        check_token_range(local, self.vocab_size)
      like = local
      n += 1
      yield local
    self.counts[name] = n

  def measure(self, step: int, state: TrainState) -> dict:
    out = {}
    total = weight = 0.0
    with partitioning.mesh_context(self.setup.mesh):
      for name in self.sources:
        pending = [
          self._sums(state.params, global_batch(self.setup, local, self.shape))
          for local in self._local_batches(name)
        ]
        fetched = jax.device_get(pending)
        s, w = sum(float(a) for a, _ in fetched), sum(float(b) for _, b in fetched)
        total, weight = total + s, weight + w
        if name is not None and w > 0:
          loss = s / w
          out[f"eval_loss/{name}"] = loss
          out[f"eval_perplexity/{name}"] = math.exp(min(loss, 50.0))
          out[f"eval_tokens/{name}"] = w
    loss = total / max(weight, 1.0)
    return {
      "eval_loss": loss,
      "eval_perplexity": math.exp(min(loss, 50.0)),
      "eval_tokens": weight,
      **out,
    }


def _all_hosts(flag: bool) -> bool:
  """`flag` on every process (a host-side all-gather when there are several)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


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
