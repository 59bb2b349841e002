"""The train state on the mesh: its shapes and shardings, the compiled step (`build_state`), a fresh
state (random init, or params from a checkpoint: `initial_state`), and each host's rows of the
global batch. Used by `geex-train` and by bench/train.py alike."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from geex_jax.errors import ConfigError
from geex_jax.model import checkpoints, partitioning
from geex_jax.model.codegeex import CodeGeeXConfig, init_params, param_logical_specs
from geex_jax.training.step import TrainState, make_train_step


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())

  return NamedSharding(mesh, P())


def state_shardings(
  config: CodeGeeXConfig, optimizer: optax.GradientTransformation, mesh
) -> tuple[TrainState, TrainState]:
  """(abstract TrainState of ShapeDtypeStructs, TrainState of NamedShardings)."""
  param_sh = partitioning.logical_to_sharding(param_logical_specs(config), mesh)
  abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
  opt_abstract = jax.eval_shape(optimizer.init, abstract)
  is_sharding = lambda x: isinstance(x, NamedSharding)
  # Moments take their parameter's sharding; counts and other scalars are replicated.
  opt_sh = optax.tree_map_params(
    optimizer,
    lambda _, s: s,
    opt_abstract,
    param_sh,
    transform_non_params=lambda _: replicated(mesh),
    is_leaf=is_sharding,
  )
  shardings = TrainState(replicated(mesh), param_sh, opt_sh)
  shapes = TrainState(jax.ShapeDtypeStruct((), jnp.int32), abstract, opt_abstract)
  return shapes, shardings


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


def host_data_shard(sharding: NamedSharding, global_batch: int) -> tuple[int, int]:
  """(shard_index, num_shards) of this process's rows of the global batch under `sharding`.

  The rows a process feeds are the union of its devices' slices: one contiguous block. Hosts
  whose devices hold the same rows (a model axis spanning hosts) get the same shard index.
  """
  index_map = sharding.addressable_devices_indices_map((global_batch, 1))
  spans = {
    (s[0].start or 0, global_batch if s[0].stop is None else s[0].stop) for s in index_map.values()
  }
  start, stop = min(a for a, _ in spans), max(b for _, b in spans)
  covered = sum(b - a for a, b in spans)
  if covered != stop - start or global_batch % (stop - start):
    raise ConfigError(
      f"this host's rows of the batch are not one block ({sorted(spans)}); use "
      "a mesh whose data/fsdp axes follow the host order"
    )
  rows = stop - start
  return start // rows, global_batch // rows


@dataclasses.dataclass(frozen=True)
class StateSetup:
  """Everything about the train state that does not depend on its values."""

  mesh: Mesh
  shapes: TrainState  # of jax.ShapeDtypeStruct
  shardings: TrainState  # of NamedSharding
  batch_sharding: NamedSharding
  step_fn: Callable  # jitted step(state, batch, rng) -> (state, metrics), state donated
  optimizer: optax.GradientTransformation


def build_state(
  config: CodeGeeXConfig,
  mesh: Mesh,
  optimizer: optax.GradientTransformation,
  schedule: Callable[[Any], Any],
  *,
  microbatches: int = 1,
) -> StateSetup:
  """Shapes and shardings of the state (by the logical axis rules) and the step compiled with
  them: params and optimizer state sharded, the batch split over data x fsdp, the state donated."""
  shapes, shardings = state_shardings(config, optimizer, mesh)
  batch_sh = partitioning.batch_sharding(mesh)
  micro_sh = NamedSharding(mesh, P(None, ("data", "fsdp"), None))
  with partitioning.mesh_context(mesh):
    step_fn = jax.jit(
      make_train_step(
        config,
        optimizer,
        schedule,
        microbatches=microbatches,
        param_shardings=shardings.params,
        microbatch_sharding=micro_sh,
      ),
      in_shardings=(shardings, batch_sh, replicated(mesh)),
      out_shardings=(shardings, replicated(mesh)),
      donate_argnums=(0,),
    )
  return StateSetup(mesh, shapes, shardings, batch_sh, step_fn, optimizer)


def global_batch(setup: StateSetup, local: dict, shape: tuple[int, int]) -> dict:
  """This host's rows of a batch (numpy) -> global arrays split over data x fsdp."""
  return {
    k: jax.make_array_from_process_local_data(setup.batch_sharding, np.asarray(v), shape)
    for k, v in local.items()
  }


def initial_state(
  setup: StateSetup, config: CodeGeeXConfig, *, seed: int, init_from: Optional[str] = None
) -> tuple[TrainState, str]:
  """(step-0 state, how it was made): params from `init_from` if given, else random (`seed`)."""
  shardings = setup.shardings
  with partitioning.mesh_context(setup.mesh):
    if init_from:
      params = init_from_checkpoint(init_from, config, shardings.params)
      how = f"params from {init_from}"
    else:
      params = jax.jit(lambda r: init_params(config, r), out_shardings=shardings.params)(
        jax.random.PRNGKey(seed)
      )
      how = "random init"
    opt_state = jax.jit(setup.optimizer.init, out_shardings=shardings.opt_state)(params)
  state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params, opt_state)
  return state, how


SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_size", "max_position")


def check_same_shape(config: CodeGeeXConfig, other: CodeGeeXConfig, where: str) -> None:
  diff = [
    f"{f}: {getattr(other, f)} there vs {getattr(config, f)} here"
    for f in SHAPE_FIELDS
    if getattr(config, f) != getattr(other, f)
  ]
  if diff:
    raise ConfigError(f"the model in {where} has another shape ({'; '.join(diff)})")


def init_from_checkpoint(path: str, config: CodeGeeXConfig, shardings: Any) -> Any:
  """Params of a converted (params-only) or trained checkpoint, cast to the master dtype and
  placed with `shardings`."""
  stored = checkpoints.load_config(path)
  check_same_shape(config, stored, path)
  dtype = config.weight_dtype
  if stored.scan_layers == config.scan_layers:
    # Same layout: each host restores only its shards.
    _, params = checkpoints.load_params(path, shardings=shardings)
    return jax.tree.map(lambda x, s: jax.device_put(x.astype(dtype), s), params, shardings)
  _, params = checkpoints.load_params(path, dtype=dtype, scan_layers=config.scan_layers)
  return jax.tree.map(jax.device_put, params, shardings)
