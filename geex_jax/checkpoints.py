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


# ---------------------------------------------------------------------------------------------
# Streaming access: write and read a params checkpoint one tensor (or one layer) at a time, so that
# converting a checkpoint larger than RAM needs memory for a single tensor only. Both sides go
# through Orbax's own TensorStore specs, so what is written here is an ordinary Orbax PyTree
# checkpoint (`load_params` and the trainer restore it) and what is read here can be any Orbax
# params checkpoint.


@dataclasses.dataclass(frozen=True)
class LazyArray:
  """A params leaf whose data is produced on demand while the checkpoint is written.

  shape/dtype: of the whole leaf. pieces: (index, produce) pairs; `produce()` returns the numpy
  data of `leaf[index]`, or of the whole leaf when index is None. A stacked (scanned) leaf has one
  piece per layer, index i, each of shape shape[1:].
  """
  shape: tuple
  dtype: Any
  pieces: tuple

  @property
  def size(self) -> int:  # Orbax checks leaves for zero size before writing
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    return self.size * np.dtype(self.dtype).itemsize


def _lazy_handler(on_bytes):
  """An Orbax NumpyHandler that writes LazyArray leaves piece by piece, one leaf at a time."""
  import asyncio
  import tensorstore as ts
  from orbax.checkpoint._src.serialization import ocdbt_utils
  from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
  from orbax.checkpoint._src.serialization import type_handlers

  class LazyArrayHandler(type_handlers.NumpyHandler):
    # typestr() stays "np.ndarray": the checkpoint's metadata then names the stock NumpyHandler,
    # so restoring needs nothing from this module.

    def __init__(self):
      super().__init__(deepcopy_host_arrays=False)  # a deepcopy would defeat the laziness

    async def _background_serialize(self, values, infos, args):
      # Sequential on purpose: the stock handler gathers every write at once, which would hold
      # every leaf in memory together.
      pending = None
      # Orbax's context, except for file_io_sync: TensorStore would fsync every piece (several
      # syncs per OCDBT commit, hundreds of commits: most of the wall time); the caller syncs
      # the finished checkpoint once instead. Shared by all leaves, which write one OCDBT
      # database.
      context = ts.Context({"file_io_concurrency": {"limit": 128},
                            "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000},
                            "file_io_sync": False})

      async def _counted(write, nbytes):
        await write
        on_bytes(nbytes)

      try:
        for value, info, arg in zip(values, infos, args):
          await info.await_path_creation()
          stacked = value.pieces and value.pieces[0][0] is not None
          # A stacked leaf gets one zarr shard ("write shape") per layer, so each layer's slice is
          # an independent write; one shard for the whole leaf would make every slice write
          # read-modify-write the entire stacked array.
          write_shape = (1, *value.shape[1:]) if stacked else tuple(value.shape)
          spec = ts_utils.build_array_write_spec(
              info=info, arg=arg, global_shape=tuple(value.shape), local_shape=write_shape,
              dtype=np.dtype(value.dtype), use_ocdbt=info.is_ocdbt_checkpoint,
              process_index=ocdbt_utils.get_process_index_for_subdir(
                  use_ocdbt=info.is_ocdbt_checkpoint))
          store = await ts.open(ts.Spec(spec.json), create=True, open=True, context=context)
          for index, produce in value.pieces:
            data = np.asarray(produce())
            target = store if index is None else store[index]
            if data.shape != tuple(target.shape) or data.dtype != np.dtype(value.dtype):
              raise CheckpointError(
                  f"{info.name}[{index}]: produced {data.dtype}{list(data.shape)}, expected "
                  f"{np.dtype(value.dtype)}{list(target.shape)}")
            # One write in flight while the next piece is produced: TensorStore writes on its own
            # threads, so reading/casting overlaps the disk, for at most two pieces of memory.
            # The pieces are fresh arrays nobody mutates, so TensorStore may use them uncopied.
            if pending is not None:
              await pending
            pending = asyncio.ensure_future(_counted(
                target.write(data, can_reference_source_data_indefinitely=True), data.nbytes))
            del data
        if pending is not None:
          await pending
      except BaseException:
        # Let the write in flight finish (cancelling does not stop TensorStore's commit): a write
        # landing after the caller removed the partial checkpoint would recreate it.
        if pending is not None:
          await asyncio.gather(pending, return_exceptions=True)
        raise

  return LazyArrayHandler()


def save_params_streaming(directory: os.PathLike, config: CodeGeeXConfig, tree: Any, *,
                          compress: bool = False, on_bytes=lambda n: None) -> None:
  """Writes a params-only checkpoint (config.json + params/) from a tree of LazyArray leaves.

  Peak memory is about one piece (a tensor or one layer's slice) plus TensorStore's buffers.
  compress: zstd the chunks (Orbax's default). Off by default: trained weights barely compress
  and zstd would be the bottleneck of a conversion. on_bytes(n) is called after each piece.
  """
  import jax as _jax
  import orbax.checkpoint as ocp
  from orbax.checkpoint._src.serialization import type_handler_registry
  from orbax.checkpoint._src.serialization import type_handlers
  registry = type_handler_registry.create_type_handler_registry(
      (LazyArray, _lazy_handler(on_bytes)),
      (np.ndarray, type_handlers.NumpyHandler()),
      (_jax.Array, type_handlers.ArrayHandler()))
  path = pathlib.Path(directory).absolute()
  save_config(path, config)
  handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=compress)
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save(path / PARAMS_ITEM, tree, force=True)
  sync_tree(path)


def sync_tree(root: pathlib.Path) -> None:
  """fsyncs every file and directory under `root` (one pass instead of a sync per write)."""
  for directory, _, files in os.walk(root, topdown=False):
    for name in [*files, "."]:
      fd = os.open(os.path.join(directory, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)


class StoredParams:
  """Read access to a params checkpoint's leaves without loading them: `leaves` maps a leaf's
  key path (tuple of str) to a TensorStore; `read(keys, index)` reads one leaf or one layer."""

  def __init__(self, directory: os.PathLike):
    import tensorstore as ts
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils
    self.path = params_path(directory).absolute()  # first: "not found" beats "no config.json"
    self.config = load_config(directory)
    try:
      meta = json.loads((self.path / "_METADATA").read_text())
      context = ts_utils.get_ts_context(use_ocdbt=bool(meta["use_ocdbt"]))
      self.leaves = {}
      for entry in meta["tree_metadata"].values():
        keys = tuple(str(k["key"]) for k in entry["key_metadata"])
        spec = ts_utils.ArrayReadSpec(
            directory=self.path.as_posix(), relative_array_filename=".".join(keys),
            use_zarr3=bool(meta.get("use_zarr3", False)), use_ocdbt=bool(meta["use_ocdbt"]))
        self.leaves[keys] = ts.open(ts.Spec(spec.json), open=True, context=context).result()
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"cannot read params from {self.path}: {type(e).__name__}: {e}"
                            ) from None

  def read(self, keys: tuple, index: Optional[int] = None) -> np.ndarray:
    return self.read_async(keys, index).result()

  def read_async(self, keys: tuple, index: Optional[int] = None):
    """Starts reading (on TensorStore's threads); `.result()` of the returned future is the
    numpy array. Lets a caller fetch the next tensor while it processes the current one."""
    store = self.leaves[tuple(keys)]
    return (store if index is None else store[index]).read()
