"""The device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: `data` (pure data parallel: params replicated), `fsdp` (data parallel with params and
optimizer state sharded, ZeRO-3 style), `model` (tensor parallel: heads, MLP and vocab split).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from geex_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "model")

# logical name -> mesh axis (or axes, or None = replicated). Parameter names first, then
# activation names. Order matters only for names listed twice (the first that fits wins).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
  # parameters
  ("vocab", "model"),
  ("embed", "fsdp"),
  ("heads", "model"),
  ("kv", None),
  ("mlp", "model"),
  ("layers", None),
  # activations
  ("batch", ("data", "fsdp")),
  ("length", None),
  ("cache_length", None),
  ("act_embed", None),
  ("act_heads", "model"),
  ("act_mlp", "model"),
  ("act_vocab", "model"),
)


@gin.configurable("logical_axis_rules")
def configured_rules(
  rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> tuple[tuple[str, Any], ...]:
  """The rules in force: LOGICAL_AXIS_RULES unless gin binds another table, e.g.
  `logical_axis_rules.rules = [("embed", None), ("mlp", "model"), ...]` (every name the model
  uses must appear; a name mapped to None is replicated)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 entry with the remaining devices and checks the product."""
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {shape} must have {len(MESH_AXES)} entries {MESH_AXES}")
  unknown = [i for i, s in enumerate(shape) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh shape {shape}: at most one entry may be -1")
  known = math.prod(s for s in shape if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape} does not divide {num_devices} devices")
    shape[unknown[0]] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(
      f"mesh shape {tuple(shape)} needs {math.prod(shape)} devices, {num_devices} are available"
    )
  return tuple(shape)


def make_mesh(
  data: int = -1, fsdp: int = 1, model: int = 1, devices: Optional[Sequence[jax.Device]] = None
) -> Mesh:
  """A ('data', 'fsdp', 'model') mesh over all (or the given) devices; -1 takes the rest.

  `model` is the fastest-varying axis, so tensor-parallel groups sit on neighbouring devices
  (same host / ICI ring), as they need the most bandwidth.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape((data, fsdp, model), len(devices))
  try:
    from jax.experimental import mesh_utils

    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def model_parallel_mesh(n: int) -> Optional[Mesh]:
  """The inference mesh of `--model_parallel n`: the weights over the first n devices' `model`
  axis; None for n = 1. ConfigError when there are fewer devices."""
  if n <= 1:
    return None
  if jax.device_count() < n:
    raise ConfigError(
      f"--model_parallel {n} needs that many devices; {jax.device_count()} available"
    )
  return make_mesh(1, 1, n, devices=jax.devices()[:n])


def logical_to_sharding(
  logical_specs: Any, mesh: Mesh, rules: Optional[Sequence[tuple[str, Any]]] = None
) -> Any:
  """A tree of logical PartitionSpecs -> a tree of NamedShardings on `mesh` (rules: the
  configured ones by default)."""
  rules = configured_rules() if rules is None else rules
  return nn.logical_to_mesh_sharding(logical_specs, mesh, list(rules))


def check_divisible(shapes: Any, shardings: Any) -> None:
  """ConfigError naming the first array whose dims do not divide by the mesh axes sharding them
  (e.g. 20 heads over model=8), instead of XLA's error deep inside device_put or jit."""
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings)):
    spec = sharding.spec
    for dim, (size, axes) in enumerate(zip(leaf.shape, spec)):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      ways = math.prod(sharding.mesh.shape[a] for a in axes)
      if size % ways:
        name = jax.tree_util.keystr(path, simple=True, separator="/")
        raise ConfigError(
          f"{name} {tuple(leaf.shape)}: dim {dim} ({size}) does not divide "
          f"over the mesh axis {'x'.join(axes)} = {ways}; choose a mesh whose "
          f"{'x'.join(axes)} size divides it"
        )


def shard_params(
  params: Any, logical_specs: Any, mesh: Mesh, rules: Optional[Sequence[tuple[str, Any]]] = None
) -> Any:
  """Places (unboxed) params on the mesh according to their logical axis names."""
  shardings = logical_to_sharding(logical_specs, mesh, rules)
  check_divisible(params, shardings)
  return jax.tree.map(jax.device_put, params, shardings)


def batch_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
  """Sharding of a [batch, ...] input array: batch split over data x fsdp."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (rank - 1))))


def axis_rules(rules: Optional[Sequence[tuple[str, Any]]] = None):
  """Context manager activating the rules (the configured ones by default) for
  nn.with_logical_constraint inside the model."""
  return nn.logical_axis_rules(list(configured_rules() if rules is None else rules))


def mesh_context(mesh: Optional[Mesh]) -> contextlib.ExitStack:
  """`with mesh, axis_rules():` for the model's logical constraints (nothing for mesh=None).

  flax's logical constraints need the legacy `with mesh:` resource env (under jax.set_mesh they
  resolve against an abstract mesh and fail); jax deprecates it, so its warning is silenced here.
  """
  stack = contextlib.ExitStack()
  if mesh is None:
    return stack
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    stack.enter_context(mesh)
  stack.enter_context(axis_rules())
  return stack
