"""Where geex-jax checkpoints live on disk, and reading their parameters back.

Two layouts, both readable by `load_params(DIR)`:

* a params-only checkpoint (what `geex-convert torch-to-jax` writes)::

    DIR/config.json      the CodeGeeXConfig (dataclasses.asdict) + {"format": "geex-jax"}
    DIR/params/          an Orbax PyTree checkpoint of the params tree

* a training run (what `geex-train` writes, an Orbax CheckpointManager)::

    MODEL_DIR/config.json
    MODEL_DIR/checkpoints/<step>/params/    (+ opt_state/, data_state/, ... beside it)

  `load_params(MODEL_DIR)` reads the latest step; `load_params(MODEL_DIR/checkpoints/<step>)`
  a given one.

The params tree is stored in the layout of the stored config's `scan_layers` (stacked `layers`
or `layers_0..`); `load_params` converts it to the layout the caller asks for.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from geex_jax.errors import CheckpointError
from geex_jax.model import CodeGeeXConfig, convert_layout

CONFIG_FILE = "config.json"
PARAMS_ITEM = "params"
CHECKPOINTS_SUBDIR = "checkpoints"
FORMAT_TAG = "geex-jax"


def save_config(directory: os.PathLike, config: CodeGeeXConfig) -> None:
  path = pathlib.Path(directory)
  path.mkdir(parents=True, exist_ok=True)
  payload = {"format": FORMAT_TAG, "model": dataclasses.asdict(config)}
  tmp = path / (CONFIG_FILE + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
  tmp.replace(path / CONFIG_FILE)


def load_config(directory: os.PathLike) -> CodeGeeXConfig:
  """Reads config.json from DIR or the nearest parent that has one (a step dir's run dir)."""
  path = pathlib.Path(directory).resolve()
  for candidate in (path, *path.parents):
    f = candidate / CONFIG_FILE
    if f.is_file():
      try:
        payload = json.loads(f.read_text())
        return CodeGeeXConfig(**payload["model"])
      except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f} is not a geex-jax config: {e}") from None
  raise CheckpointError(f"no {CONFIG_FILE} in {path} or its parents: not a geex-jax checkpoint")


def latest_step(model_dir: os.PathLike) -> Optional[int]:
  """The newest finished step under MODEL_DIR/checkpoints, or None."""
  root = pathlib.Path(model_dir) / CHECKPOINTS_SUBDIR
  if not root.is_dir():
    return None
  steps = [int(p.name) for p in root.iterdir()
           if p.is_dir() and p.name.isdigit() and (p / PARAMS_ITEM).is_dir()]
  return max(steps) if steps else None


def params_path(directory: os.PathLike) -> pathlib.Path:
  """The Orbax params directory of a params-only checkpoint, a run dir, or a step dir."""
  path = pathlib.Path(directory)
  if not path.exists():
    raise CheckpointError(f"checkpoint not found: {path}")
  if (path / PARAMS_ITEM).is_dir():
    return path / PARAMS_ITEM
  step = latest_step(path)
  if step is not None:
    return path / CHECKPOINTS_SUBDIR / str(step) / PARAMS_ITEM
  raise CheckpointError(f"{path} holds no geex-jax params (expected {PARAMS_ITEM}/ or "
                        f"{CHECKPOINTS_SUBDIR}/<step>/{PARAMS_ITEM}/)")


def save_params(directory: os.PathLike, config: CodeGeeXConfig, params: Any) -> None:
  """Writes a params-only checkpoint (config.json + params/)."""
  import orbax.checkpoint as ocp
  path = pathlib.Path(directory).absolute()
  save_config(path, config)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(path / PARAMS_ITEM, params, force=True)


def load_params(directory: os.PathLike, *, dtype: Optional[Any] = None,
                scan_layers: Optional[bool] = None, shardings: Any = None
                ) -> tuple[CodeGeeXConfig, Any]:
  """Returns (config, params) of a converted or trained checkpoint.

  dtype: cast the params (e.g. jnp.bfloat16); None keeps the stored dtype.
  scan_layers: return the stacked (True) or per-layer (False) layout; None keeps the stored one
    (the returned config's scan_layers always matches the returned params).
  shardings: optional tree of jax.sharding.Sharding (in the STORED layout) to restore each array
    directly onto devices (multi-host / sharded restore); None restores to the default device.
  """
  import orbax.checkpoint as ocp
  config = load_config(directory)
  path = params_path(directory).absolute()
  try:
    with ocp.PyTreeCheckpointer() as ckptr:
      metadata = ckptr.metadata(path)
      tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
      if shardings is None:
        restore_args = jax.tree.map(
            lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree,
            is_leaf=lambda x: hasattr(x, "shape"))
      else:
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
      params = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except CheckpointError:
    raise
  except Exception as e:  # orbax raises many types for a damaged directory
    raise CheckpointError(f"cannot read params from {path}: {type(e).__name__}: {e}") from None
  if dtype is not None:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  if scan_layers is not None and scan_layers != config.scan_layers:
    params = convert_layout(params, config, scan_layers)
    config = config.replace(scan_layers=scan_layers)
  if shardings is None:
    params = jax.tree.map(jnp.asarray, params)
  return config, params
