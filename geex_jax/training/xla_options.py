"""XLA compiler options for `geex-train`, from gin, as XLA_FLAGS set before the backend starts.

    xla_options.options = {'latency_hiding_scheduler': True, 'while_loop_double_buffering': True}
    xla_options.options = {'command_buffer': 'FUSION,CUBLAS,CUDNN,CUSTOM_CALL'}  # '' = off

XLA reads XLA_FLAGS once, when the first backend is created, so `geex-train` applies them right
after parsing gin and before anything touches a device (jax.distributed included). The
bindings are part of the gin config, hence of MODEL_DIR/config.gin. Flags XLA does not know
abort the process, so only the names below are accepted; `extra_flags` passes others verbatim.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import gin

from geex_jax.errors import ConfigError

# gin name -> XLA flag. GPU flags are ignored by CPU and TPU backends (TPU options go in
# LIBTPU_INIT_ARGS instead).
XLA_OPTIONS: dict[str, str] = {
  # Overlap of compute with communication and copies (GPU).
  "latency_hiding_scheduler": "xla_gpu_enable_latency_hiding_scheduler",
  "while_loop_double_buffering": "xla_gpu_enable_while_loop_double_buffering",
  "highest_priority_async_stream": "xla_gpu_enable_highest_priority_async_stream",
  "pipelined_all_gather": "xla_gpu_enable_pipelined_all_gather",
  "pipelined_reduce_scatter": "xla_gpu_enable_pipelined_reduce_scatter",
  "pipelined_all_reduce": "xla_gpu_enable_pipelined_all_reduce",
  "all_gather_combine_threshold_bytes": "xla_gpu_all_gather_combine_threshold_bytes",
  "reduce_scatter_combine_threshold_bytes": "xla_gpu_reduce_scatter_combine_threshold_bytes",
  "all_reduce_combine_threshold_bytes": "xla_gpu_all_reduce_combine_threshold_bytes",
  # Launch overhead and kernels (GPU).
  "command_buffer": "xla_gpu_enable_command_buffer",  # CUDA graphs: comma list of kinds
  "graph_min_graph_size": "xla_gpu_graph_min_graph_size",
  "triton_gemm": "xla_gpu_enable_triton_gemm",
  "autotune_level": "xla_gpu_autotune_level",
  "dot_merger_threshold_mb": "xla_gpu_dot_merger_threshold_mb",
  "memory_limit_slop_factor": "xla_gpu_memory_limit_slop_factor",
  # Any backend.
  "host_device_count": "xla_force_host_platform_device_count",  # CPU devices (tests)
  "dump_to": "xla_dump_to",  # write the HLO of every compilation to this directory
}


def _value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return ",".join(str(v) for v in value)
  return str(value)


@gin.configurable
def xla_options(
  options: Optional[Mapping[str, Any]] = None, extra_flags: Sequence[str] = ()
) -> list[str]:
  """The XLA flags (`--name=value`) for `options` ({name in XLA_OPTIONS: value}) and
  `extra_flags` (verbatim `--xla_...=...` strings)."""
  options = dict(options or {})
  unknown = sorted(set(options) - set(XLA_OPTIONS))
  if unknown:
    raise ConfigError(
      f"xla_options.options: unknown option(s) {', '.join(map(repr, unknown))}; known: "
      f"{', '.join(XLA_OPTIONS)} (or pass a raw flag in xla_options.extra_flags)"
    )
  flags = [f"--{XLA_OPTIONS[name]}={_value(value)}" for name, value in options.items()]
  for flag in extra_flags:
    if not str(flag).startswith("--xla"):
      raise ConfigError(f"xla_options.extra_flags: {flag!r} is not an XLA flag (--xla_...)")
    flags.append(str(flag))
  return flags


def apply(flags: Sequence[str]) -> str:
  """Appends `flags` to $XLA_FLAGS (later flags win over the environment's); returns the new
  value. Refuses once a JAX backend exists: XLA would ignore them silently."""
  if not flags:
    return os.environ.get("XLA_FLAGS", "")
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized():
    raise ConfigError(
      "xla_options: a JAX backend is already initialised, XLA_FLAGS would be ignored"
    )
  value = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
  os.environ["XLA_FLAGS"] = value
  return value
