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

Every DIR may be a local path or a gs:// URL (`fileio.as_path` decides which; Orbax and TensorStore
read and write GCS themselves). The paths returned here are `etils.epath.Path`s.
"""

from __future__ import annotations

import dataclasses
import json
import contextlib
import logging
import mmap
import os
import sys
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from geex_jax import fileio
from geex_jax.model import streaming
from geex_jax.errors import CheckpointError
from geex_jax.model.codegeex import CodeGeeXConfig, convert_layout

CONFIG_FILE = "config.json"
PARAMS_ITEM = "params"
CHECKPOINTS_SUBDIR = "checkpoints"
FORMAT_TAG = "geex-jax"
# Orbax's mark of a finished checkpoint on GCS, where it cannot rename a temporary directory into
# place: a gs:// checkpoint (or step) without it is incomplete and is not restored.
GCS_COMMIT_FILE = "commit_success.txt"


def save_config(directory: os.PathLike, config: CodeGeeXConfig) -> None:
  path = fileio.as_path(directory)
  if not fileio.is_url(path):
    path.mkdir(parents=True, exist_ok=True)
  payload = {"format": FORMAT_TAG, "model": dataclasses.asdict(config)}
  fileio.write_atomic(path / CONFIG_FILE, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _self_and_parents(path) -> list:
  """`path` and its parents, up to the filesystem root or (gs://) the bucket."""
  chain = [path, *path.parents]
  if fileio.is_url(path):
    # epath lists the scheme itself ("gs://") and "/" as parents of a bucket.
    chain = [p for p in chain if fileio.is_url(p) and os.fspath(p).split("://", 1)[1]]
  return chain


def load_config(directory: os.PathLike) -> CodeGeeXConfig:
  """Reads config.json from DIR or the nearest parent that has one (a step dir's run dir)."""
  path = fileio.as_path(directory)
  if not fileio.is_url(path):
    path = type(path)(os.path.realpath(path))
  for candidate in _self_and_parents(path):
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
  root = fileio.as_path(model_dir) / CHECKPOINTS_SUBDIR
  if not root.is_dir():
    return None
  remote = fileio.is_url(root)
  steps = [
    int(p.name)
    for p in root.iterdir()
    if p.name.isdigit()
    and (p / PARAMS_ITEM).is_dir()
    and (not remote or (p / GCS_COMMIT_FILE).exists())
  ]
  return max(steps) if steps else None


def mark_committed(directory: os.PathLike) -> None:
  """Adds Orbax's GCS commit mark to the params of a checkpoint written locally, so that once
  uploaded to gs:// it restores like one Orbax wrote there (the converter writes locally, then
  uploads)."""
  path = fileio.as_path(directory) / PARAMS_ITEM
  (path / GCS_COMMIT_FILE).write_text(f"Checkpoint commit was successful to {path}")


def params_path(directory: os.PathLike):
  """The Orbax params directory (an epath.Path) of a params-only checkpoint, a run dir, or a step
  dir."""
  path = fileio.as_path(directory)
  if not path.exists():
    raise CheckpointError(f"checkpoint not found: {path}")
  if (path / PARAMS_ITEM).is_dir():
    return path / PARAMS_ITEM
  step = latest_step(path)
  if step is not None:
    return path / CHECKPOINTS_SUBDIR / str(step) / PARAMS_ITEM
  raise CheckpointError(
    f"{path} holds no geex-jax params (expected {PARAMS_ITEM}/ or "
    f"{CHECKPOINTS_SUBDIR}/<step>/{PARAMS_ITEM}/)"
  )


def save_params(directory: os.PathLike, config: CodeGeeXConfig, params: Any) -> None:
  """Writes a params-only checkpoint (config.json + params/)."""
  import orbax.checkpoint as ocp

  path = fileio.as_path(directory)
  save_config(path, config)
  with ocp.PyTreeCheckpointer() as ckptr:
    ckptr.save(path / PARAMS_ITEM, params, force=True)


def load_params(
  directory: os.PathLike,
  *,
  dtype: Optional[Any] = None,
  scan_layers: Optional[bool] = None,
  shardings: Any = None,
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
  path = params_path(directory)
  try:
    # A trainer's params/ sits inside a step directory whose _CHECKPOINT_METADATA is one level
    # up; Orbax warns that params/ has none of its own, which is expected.
    with _absl_without("Metadata file does not exist"), ocp.PyTreeCheckpointer() as ckptr:
      metadata = ckptr.metadata(path)
      tree = metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata
      if shardings is None:
        restore_args = jax.tree.map(
          lambda m: ocp.RestoreArgs(restore_type=np.ndarray),
          tree,
          is_leaf=lambda x: hasattr(x, "shape"),
        )
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
# converting a checkpoint larger than RAM needs memory for a few tensors only. Both sides go
# through Orbax's own TensorStore specs, so what is written here is an ordinary Orbax PyTree
# checkpoint (`load_params` and the trainer restore it) and what is read here can be any Orbax
# params checkpoint.
#
# The streaming writer stores plain zarr arrays (one directory per leaf, one file per chunk),
# not OCDBT: with uncompressed chunks a chunk file is just the array's bytes, so it can be written
# with one write() from the produced array and read back as a memory map, where TensorStore copies
# every chunk through its own buffers (measured on 5.3 GB: TensorStore ~1.1 CPU-seconds per GB
# to read and to write, a memory map ~0.05 and a write() ~0.45). TensorStore still creates each
# array (its .zarray metadata) and does all I/O for any other layout (compressed, OCDBT, zarr3).


@dataclasses.dataclass(frozen=True)
class LazyArray:
  """A params leaf whose data is produced on demand while the checkpoint is written.

  shape/dtype: of the whole leaf. pieces: (index, produce) pairs; `produce()` returns the numpy
  data of `leaf[index]`, or of the whole leaf when index is None. A stacked (scanned) leaf has one
  piece per layer, index i, each of shape shape[1:]. `produce` is called on a worker thread, one
  piece at a time: the largest pieces of the tree first, else in tree and layer order.
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


def _raw_chunk_dir(spec: dict, chunk_shape: tuple) -> Optional[str]:
  """The directory of an array's chunk files if every chunk has `chunk_shape` and is stored as
  its bare C-order bytes in a local file named by its grid position ("3.0.0"): zarr v2 without
  compressor or filters. None for any other layout, which then goes through TensorStore."""
  meta = spec.get("metadata", {})
  dtype = str(meta.get("dtype", ""))
  native = dtype == "bfloat16" or dtype[:1] in ("|", "<" if sys.byteorder == "little" else ">")
  if (
    spec.get("driver") == "zarr"
    and spec.get("kvstore", {}).get("driver") == "file"
    and meta.get("compressor") is None
    and meta.get("filters") is None
    and meta.get("order") == "C"
    and meta.get("dimension_separator", ".") == "."
    and native
    and len(chunk_shape) > 0
    and tuple(meta.get("chunks", ())) == tuple(chunk_shape)
  ):
    return spec["kvstore"]["path"]
  return None


def _chunk_key(index: Optional[int], ndim: int) -> str:
  """The chunk file of a whole single-chunk leaf (index None) or of layer `index` of a leaf
  chunked per layer."""
  if index is None:
    return ".".join(["0"] * ndim)
  return ".".join([str(index)] + ["0"] * (ndim - 1))


def _write_chunk(path: str, data: np.ndarray) -> None:
  with open(path, "wb") as f:
    f.write(memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8)))


def _lazy_handler(on_bytes, budget: int):
  """An Orbax NumpyHandler that writes LazyArray leaves piece by piece through
  `streaming.run`: one thread produces the pieces in order while two write the previous ones
  and one syncs what they wrote, with at most `budget` bytes of produced data in flight."""
  import asyncio
  import orbax.checkpoint as ocp
  import tensorstore as ts

  class Sink:
    """Where the pieces of one leaf go: its chunk files, or TensorStore."""

    def __init__(self, value, store, stacked: bool):
      self.store, self.stacked = store, stacked
      self.dtype = np.dtype(value.dtype)
      self.piece_shape = tuple(value.shape[1:]) if stacked else tuple(value.shape)
      self.piece_nbytes = int(np.prod(self.piece_shape)) * self.dtype.itemsize
      chunk = (1, *self.piece_shape) if stacked else self.piece_shape
      self.raw_dir = _raw_chunk_dir(store.spec().to_json(), chunk)

    def write(self, index, data: np.ndarray, syncs: streaming.BackgroundSync) -> None:
      """Writes one piece (runs on a writer thread)."""
      if self.raw_dir is not None:
        path = os.path.join(self.raw_dir, _chunk_key(index, len(self.store.shape)))
        _write_chunk(path, data)
        # Synced in the background, in write order: the disk works from the first chunk on
        # while the writers go on (syncing on the writer threads would stall them whenever the
        # disk lags).
        syncs.sync(path)
      else:
        # The pieces are fresh arrays nobody mutates, so TensorStore may use them uncopied.
        target = self.store if index is None else self.store[index]
        target.write(data, can_reference_source_data_indefinitely=True).result()

  def produce(item, _) -> np.ndarray:
    sink, index, make, name = item
    data = np.asarray(make())
    if data.shape != sink.piece_shape or data.dtype != sink.dtype:
      raise CheckpointError(
        f"{name}[{index}]: produced {data.dtype}{list(data.shape)}, "
        f"expected {sink.dtype}{list(sink.piece_shape)}"
      )
    return data

  class LazyArrayHandler(ocp.type_handlers.NumpyHandler):
    # typestr() stays "np.ndarray": the checkpoint's metadata then names the stock NumpyHandler,
    # so restoring needs nothing from this module.

    def __init__(self):
      super().__init__(deepcopy_host_arrays=False)  # a deepcopy would defeat the laziness

    async def _open(self, value, info, arg, context) -> Sink:
      await info.await_path_creation()
      stacked = bool(value.pieces) and value.pieces[0][0] is not None
      # A stacked leaf gets one chunk per layer, so each layer's slice is an independent write;
      # one chunk for the whole leaf would make every slice write read-modify-write it all.
      write_shape = (1, *value.shape[1:]) if stacked else tuple(value.shape)
      # The spec Orbax's own handlers write with (OCDBT names a per-process subdirectory).
      use_ocdbt = bool(info.is_ocdbt_checkpoint)
      spec = ocp.type_handlers.get_json_tspec_write(
        info,
        use_ocdbt=use_ocdbt,
        global_shape=tuple(value.shape),
        local_shape=write_shape,
        dtype=np.dtype(value.dtype),
        process_index=ocp.multihost.process_index() if use_ocdbt else None,
        arg=arg,
      )
      store = await ts.open(ts.Spec(spec), create=True, open=True, context=context)
      return Sink(value, store, stacked)

    async def _background_serialize(self, values, infos, args):
      # Orbax's context, except for file_io_sync: TensorStore would fsync every write it makes
      # (when it writes, i.e. for layouts without the fast path); the caller syncs the finished
      # tree once instead.
      context = ts.Context(
        {
          "file_io_concurrency": {"limit": 128},
          "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000},
          "file_io_sync": False,
        }
      )
      sinks = await asyncio.gather(
        *(self._open(value, info, arg, context) for value, info, arg in zip(values, infos, args))
      )
      items = [
        (sink, index, make, info.name)
        for sink, value, info in zip(sinks, values, infos)
        for index, make in value.pieces
      ]
      # Largest pieces first (stable: otherwise in tree order). Freed blocks are reused for later,
      # smaller pieces, whereas a big piece produced last needs fresh memory on top of what the
      # heap already holds (the converter keeps freed memory, see conversion/cli.py): at 2.7B
      # the embedding (267 MB) first made peak RSS 0.98-1.14 GB instead of 1.23-1.34 GB.
      items.sort(key=lambda item: -item[0].piece_nbytes)

      def write(item, data: np.ndarray) -> None:
        sink, index, _, _ = item
        sink.write(index, data, syncs)
        on_bytes(sink.piece_nbytes)

      def stream() -> None:
        # Two writers, so that one write waiting on the page cache does not hold up the next.
        streaming.run(
          items,
          produce=produce,
          write=write,
          nbytes=lambda item: item[0].piece_nbytes,
          writers=2,
          budget=budget,
        )

      with streaming.BackgroundSync() as syncs:
        await asyncio.get_running_loop().run_in_executor(None, stream)

  return LazyArrayHandler()


class _DropMessage(logging.Filter):
  def __init__(self, text: str):
    super().__init__()
    self.text = text

  def filter(self, record: logging.LogRecord) -> bool:
    return self.text not in str(record.msg)


@contextlib.contextmanager
def _absl_without(text: str):
  """Orbax logs through absl; drop its messages containing `text` (expected, not actionable)."""
  quiet = _DropMessage(text)
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(quiet)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)


def save_params_streaming(
  directory: os.PathLike,
  config: CodeGeeXConfig,
  tree: Any,
  *,
  compress: bool = False,
  on_bytes=lambda n: None,
  buffer_bytes: int = streaming.BUDGET_BYTES,
) -> None:
  """Writes a params-only checkpoint (config.json + params/) from a tree of LazyArray leaves.

  Peak memory is about `buffer_bytes` of produced pieces (at least two). compress: zstd
  the chunks (Orbax's default). Off by default: trained weights barely compress, zstd would be
  the bottleneck of a conversion, and uncompressed chunks take the fast path (see above).
  on_bytes(n) is called after each piece.
  """
  import jax as _jax
  import orbax.checkpoint as ocp

  registry = ocp.type_handlers.create_type_handler_registry(
    (LazyArray, _lazy_handler(on_bytes, buffer_bytes)),
    (np.ndarray, ocp.type_handlers.NumpyHandler()),
    (_jax.Array, ocp.type_handlers.ArrayHandler()),
  )
  path = fileio.as_path(directory)
  save_config(path, config)
  handler = ocp.PyTreeCheckpointHandler(
    type_handler_registry=registry, use_compression=compress, use_ocdbt=False
  )
  # Orbax's finalize tries an OCDBT merge whatever the format and warns that a plain zarr
  # checkpoint has nothing to merge; that is expected here.
  with _absl_without("Skipping merge of OCDBT checkpoints"), ocp.Checkpointer(handler) as ckptr:
    ckptr.save(path / PARAMS_ITEM, tree, force=True)
  if not fileio.is_url(path):  # a GCS object is durable once its upload has finished
    sync_tree(path)


def sync_tree(root: os.PathLike) -> None:
  """fsyncs every file and directory under `root` (one pass instead of a sync per write)."""
  for directory, _, files in os.walk(root, topdown=False):
    for name in [*files, "."]:
      fileio.fsync_path(os.path.join(directory, name))


def _key_str(key) -> str:
  """A key path entry as Orbax names it in a leaf's file name (a dict key, a list index)."""
  for attr in ("key", "idx", "name"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


class _Mapped:
  """A finished read: `.result()` is the array (a read-only view of a memory-mapped chunk)."""

  def __init__(self, array: np.ndarray):
    self._array = array

  def result(self) -> np.ndarray:
    return self._array


class StoredParams:
  """Read access to a params checkpoint's leaves without loading them: `leaves` maps a leaf's
  key path (tuple of str) to a TensorStore; `read(keys, index)` reads one leaf or one layer."""

  def __init__(self, directory: os.PathLike):
    import orbax.checkpoint as ocp
    import tensorstore as ts

    th = ocp.type_handlers
    self.path = params_path(directory)  # first: "not found" beats "no config.json"
    self.config = load_config(directory)
    try:
      # The leaves and format as Orbax's public metadata reports them; each leaf is opened with
      # the TensorStore spec and context Orbax itself restores it with.
      with ocp.PyTreeCheckpointer() as ckptr:
        tree_meta = ckptr.metadata(self.path).item_metadata
      if tree_meta is None:
        raise ValueError("no PyTree metadata")
      use_ocdbt = th.is_ocdbt_checkpoint(self.path)
      context = th.get_ts_context(use_ocdbt=use_ocdbt)
      self.leaves = {}
      self._specs = {}
      flat, _ = jax.tree_util.tree_flatten_with_path(
        tree_meta.tree, is_leaf=lambda x: hasattr(x, "shape")
      )
      for key_path, leaf in flat:
        keys = tuple(_key_str(k) for k in key_path)
        info = th.ParamInfo(
          name=".".join(keys),
          parent_dir=self.path,
          use_zarr3=bool(tree_meta.use_zarr3),
          ts_context=context,
        )
        spec = th.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        self.leaves[keys] = ts.open(ts.Spec(spec), open=True, context=context).result()
        self._specs[keys] = self.leaves[keys].spec().to_json()
    except CheckpointError:
      raise
    except Exception as e:  # orbax raises many types for a damaged directory
      raise CheckpointError(
        f"cannot read params from {self.path}: {type(e).__name__}: {e}"
      ) from None

  def read(self, keys: tuple, index: Optional[int] = None) -> np.ndarray:
    return self.read_async(keys, index).result()

  def read_async(self, keys: tuple, index: Optional[int] = None):
    """Starts reading (on TensorStore's threads); `.result()` of the returned future is the
    numpy array. Lets a caller fetch the next tensor while it processes the current one.

    A region that is one uncompressed chunk file is mapped instead (no copy; the pages are read
    when the array is used), and the array is then read-only.
    """
    keys = tuple(keys)
    store = self.leaves[keys]
    mapped = self._map_chunk(keys, index)
    if mapped is not None:
      return _Mapped(mapped)
    return (store if index is None else store[index]).read()

  def _map_chunk(self, keys: tuple, index: Optional[int]) -> Optional[np.ndarray]:
    store = self.leaves[keys]
    shape = tuple(store.shape) if index is None else tuple(store.shape[1:])
    chunk = shape if index is None else (1, *shape)
    directory = _raw_chunk_dir(self._specs[keys], chunk)
    if directory is None:
      return None
    dtype = np.dtype(store.dtype.numpy_dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    try:
      with open(os.path.join(directory, _chunk_key(index, len(store.shape))), "rb") as f:
        if os.fstat(f.fileno()).st_size != nbytes or nbytes == 0:
          return None  # not the expected chunk: let TensorStore read (or report) it
        mapped = mmap.mmap(f.fileno(), nbytes, prot=mmap.PROT_READ)
    except FileNotFoundError:
      return None  # a chunk never written reads as the fill value: TensorStore knows which
    mapped.madvise(mmap.MADV_WILLNEED)  # start reading ahead if it is not cached
    return np.frombuffer(mapped, dtype).reshape(shape)
