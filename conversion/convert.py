"""Released PyTorch CodeGeeX checkpoints <-> geex-jax params checkpoints, streaming and verified.

Both directions walk `table.rows(config)` (the one mapping) one tensor at a time: a tensor is
read (memory-mapped, model-parallel parts merged, fused Q/K/V split), transformed, cast and written
before the next one is touched, so peak memory is a couple of tensors, not the checkpoint.

Output goes to a hidden staging path beside DST that is renamed into place only after everything
(verification included) succeeded; any error removes it, so a failed run leaves nothing behind.

SRC and DST may be gs:// URLs (geex_jax.fileio decides). The fast paths memory-map local files and
write with os-level I/O, so remote ends are staged through a local temporary directory (under
$TMPDIR): a released checkpoint on gs:// is downloaded first (a geex-jax checkpoint is read in
place, through TensorStore); a gs:// DST is written and verified locally, uploaded to a hidden
name beside DST, then moved into place (config.json last; on any error the upload is deleted).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import pathlib
import re
import resource
import shutil
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from geex_jax.conversion import table
from geex_jax.conversion import torch_io
from geex_jax import fileio
from geex_jax.model import checkpoints
from geex_jax.model import streaming
from geex_jax.errors import CheckpointError, InputError
from geex_jax.model.codegeex import PRESETS, CodeGeeXConfig, abstract_params, as_dtype

# Above this size --verify compares a sample of tensors bit for bit instead of running both models
# (which would need the whole model in memory twice).
VERIFY_LOGITS_MAX_PARAMS = 200_000_000
TORCH_TO_JAX_DTYPES = ("bf16", "fp32", "fp16")
JAX_TO_TORCH_DTYPES = ("fp16", "fp32", "bf16")


@dataclasses.dataclass
class Summary:
  """What a conversion did; `line()` is the CLI's final report."""

  direction: str
  dst: os.PathLike  # a pathlib.Path, or an epath.Path for gs://
  tensors: int
  bytes_written: int
  dtype: str
  seconds: float
  peak_rss: int  # bytes, the process's peak resident set during the conversion
  checkpoint_bytes: int  # size of the larger side (the reference for the RSS share)
  verify: Optional[str] = None

  @property
  def mb_per_s(self) -> float:
    return self.bytes_written / 1e6 / max(self.seconds, 1e-9)

  def line(self) -> str:
    text = (
      f"{self.direction}: {self.tensors} tensors, {_size(self.bytes_written)} "
      f"{self.dtype} in {self.seconds:.1f} s ({self.mb_per_s:.0f} MB/s), peak RSS "
      f"{_size(self.peak_rss)} ({100 * self.peak_rss / max(self.checkpoint_bytes, 1):.0f}% "
      f"of the {_size(self.checkpoint_bytes)} checkpoint) -> {self.dst}"
    )
    return text + (f"\nverify: {self.verify}" if self.verify else "")


def _size(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if n < 1000 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1000
  raise AssertionError


def peak_rss() -> int:
  """Peak resident set of this process in bytes. VmHWM rather than ru_maxrss: Linux carries
  ru_maxrss over exec(), so a child started by a big parent would report the parent's peak."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# --- output staging --------------------------------------------------------------------------


def _dst_path(dst: os.PathLike):
  """DST as given for a local path (pathlib), as an epath.Path for a gs:// URL."""
  return fileio.as_path(dst) if fileio.is_url(dst) else pathlib.Path(dst)


def _missing_parents(dst: pathlib.Path) -> list[pathlib.Path]:
  """DST's parent directories that do not exist yet, nearest first."""
  missing, parent = [], dst.absolute().parent
  while not parent.exists() and parent != parent.parent:
    missing.append(parent)
    parent = parent.parent
  return missing


def check_destination(dst, overwrite: bool) -> None:
  if dst.exists() and not overwrite:
    raise InputError(f"{dst} already exists; pass --overwrite to replace it")
  if fileio.is_url(dst):
    return  # object storage has no directories to check
  missing = _missing_parents(dst)
  existing = missing[-1].parent if missing else dst.absolute().parent
  if not existing.is_dir():
    raise InputError(f"{existing} is not a directory")


@contextlib.contextmanager
def staged(dst, overwrite: bool):
  """Yields a local staging path for `dst`; puts it in place as `dst` on success, deletes it on
  any error.

  Local `dst`: beside it, not in /tmp (the final rename must stay on one filesystem to be atomic
  and cheap); missing parent directories are created, and removed again on failure. gs:// `dst`:
  in a local temporary directory (same file name), uploaded by `_publish_remote` on success.
  """
  check_destination(dst, overwrite)
  if fileio.is_url(dst):
    with tempfile.TemporaryDirectory(prefix="geex-convert-") as tmp:
      local = pathlib.Path(tmp) / dst.name
      yield local
      _publish_remote(local, dst)
    return
  created = _missing_parents(dst)
  for parent in reversed(created):
    parent.mkdir()
  stage = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
  try:
    yield stage
    if dst.exists():
      old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
      dst.rename(old)
      stage.rename(dst)
      _remove(old)
    else:
      stage.rename(dst)
  except BaseException:
    _remove(stage)
    for parent in created:  # nearest first; only what this run created, and only if empty
      try:
        parent.rmdir()
      except OSError:
        break
    raise


def _publish_remote(local: pathlib.Path, dst) -> None:
  """Uploads the finished local output to a hidden name beside gs:// `dst`, then moves it into
  place (an existing `dst`, i.e. --overwrite, is moved aside first and deleted after). config.json
  is copied last, so a reader never finds a checkpoint's config without all of its params."""
  target = os.fspath(dst)
  parent, name = target.rsplit("/", 1)
  tag = uuid.uuid4().hex[:8]
  upload = f"{parent}/.{name}.partial-{tag}"
  last = (checkpoints.CONFIG_FILE,)
  try:
    _upload_and_move(local, dst, target, upload, old=f"{parent}/.{name}.old-{tag}", last=last)
  except OSError as e:  # the network, permissions, a missing bucket: one line, exit code 2
    raise CheckpointError(f"cannot write {target}: {type(e).__name__}: {e}") from None


def _upload_and_move(
  local: pathlib.Path, dst, target: str, upload: str, *, old: str, last: tuple[str, ...]
) -> None:
  try:
    if local.is_dir():
      fileio.copy_tree(local, upload, last=last)
    else:
      fileio.copy_file(local, upload)
    moved_aside = dst.exists()
    if moved_aside:
      fileio.move_remote_tree(target, old)
    try:
      fileio.move_remote_tree(upload, target, last=last)
    except BaseException:
      if moved_aside:
        fileio.move_remote_tree(old, target)  # put the previous DST back
      raise
    if moved_aside:
      fileio.remove(old)
  finally:
    fileio.remove(upload)  # gone already after a successful move


@contextlib.contextmanager
def _local_source(src: os.PathLike):
  """A local path for a released checkpoint at SRC: SRC itself, or for gs:// a copy in a local
  temporary directory (the file, or a directory's mp_rank_XX shard files), deleted afterwards."""
  if not fileio.is_url(src):
    yield pathlib.Path(src)
    return
  remote = fileio.as_path(src)
  if not remote.exists():
    raise InputError(f"{src}: no such file or directory")
  with tempfile.TemporaryDirectory(prefix="geex-convert-src-") as tmp:
    local = pathlib.Path(tmp) / remote.name
    try:
      if remote.is_dir():
        local.mkdir()
        for child in remote.iterdir():
          if torch_io.SHARD_PATTERN.match(child.name):
            fileio.copy_file(child, local / child.name)
      else:
        fileio.copy_file(remote, local)
    except OSError as e:
      raise InputError(f"cannot read {src}: {type(e).__name__}: {e}") from None
    yield local


def _remove(path: pathlib.Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  elif path.exists() or path.is_symlink():
    path.unlink()


def _progress(total: int, desc: str, enabled: Optional[bool]):
  from tqdm import tqdm

  return tqdm(
    total=total,
    desc=desc,
    unit="B",
    unit_scale=True,
    unit_divisor=1024,
    disable=(not sys.stderr.isatty()) if enabled is None else not enabled,
    file=sys.stderr,
    dynamic_ncols=True,
  )


# --- shapes ----------------------------------------------------------------------------------


def flax_shapes(config: CodeGeeXConfig) -> dict[str, tuple]:
  """{unscanned flax path: shape} for `config`."""
  return dict(_flax_shapes(config.replace(scan_layers=False)))


@functools.lru_cache(maxsize=8)
def _flax_shapes(config: CodeGeeXConfig) -> tuple[tuple[str, tuple], ...]:
  # Tracing the model's init costs ~20 ms per layer (0.6 s at 2.7B, once per direction and
  # check): trace one layer and repeat its shapes, all layers being alike.
  traced = config.replace(num_layers=min(config.num_layers, 1))
  tree = nn.unbox(abstract_params(traced))
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  shapes = {"/".join(str(k.key) for k in path): tuple(leaf.shape) for path, leaf in flat}
  out = []
  for path, shape in shapes.items():
    head, _, rest = path.partition("/")
    if head == "layers_0":
      out += [(f"layers_{i}/{rest}", shape) for i in range(config.num_layers)]
    else:
      out.append((path, shape))
  return tuple(out)


def torch_shapes(config: CodeGeeXConfig) -> dict[str, tuple]:
  """{released name: torch shape} for `config`, derived through the table's transforms."""
  shapes = flax_shapes(config)
  seen: dict[tuple, tuple] = {}  # every layer repeats the same few (transform, shape) pairs
  out = {}
  for torch_name, flax_path, transform in table.rows(config):
    key = (transform.name, shapes[flax_path])
    if key not in seen:
      spec = jax.ShapeDtypeStruct(shapes[flax_path], np.float32)
      seen[key] = tuple(jax.eval_shape(lambda x: transform.to_torch(x, config), spec).shape)
    out[torch_name] = seen[key]
  return out


WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.")


def infer_config(
  shapes: dict[str, tuple],
  *,
  preset: Optional[str] = None,
  num_heads: Optional[int] = None,
  vocab_size: Optional[int] = None,
) -> CodeGeeXConfig:
  """The model config of a released checkpoint: `preset` if given, else from tensor shapes.

  The head count is invisible in the shapes; it comes from `num_heads`, else from the preset of
  the same hidden size. The vocabulary is the embedding's row count unless `vocab_size` or the
  preset says otherwise (the embedding is then trimmed or padded).
  """
  if preset is not None:
    try:
      config = CodeGeeXConfig.preset(preset)
    except ValueError as e:
      raise InputError(str(e)) from None
    if num_heads is not None:
      config = config.replace(num_heads=num_heads)
  else:
    for needed in (
      WORD_EMBEDDINGS,
      "embedding.position_embeddings.weight",
      "transformer.topQueryLayer.mlp.dense_h_to_4h.weight",
    ):
      if needed not in shapes:
        raise CheckpointError(f"missing key {needed}: cannot infer the model shape")
    max_position, hidden = shapes["embedding.position_embeddings.weight"]
    layers = {int(m.group(1)) for m in map(_LAYER.match, shapes) if m}
    ffn = shapes["transformer.topQueryLayer.mlp.dense_h_to_4h.weight"][0]
    if num_heads is None:
      matches = [
        n for n, p in PRESETS.items() if p.get("hidden_size", CodeGeeXConfig.hidden_size) == hidden
      ]
      if not matches:
        raise InputError(
          f"cannot infer the number of attention heads for hidden size {hidden}; "
          "pass --num-heads or --preset"
        )
      num_heads = CodeGeeXConfig.preset(matches[0]).num_heads
    try:
      config = CodeGeeXConfig(
        vocab_size=shapes[WORD_EMBEDDINGS][0],
        hidden_size=hidden,
        num_layers=max(layers) + 1 if layers else 0,
        num_heads=num_heads,
        ffn_size=ffn,
        max_position=max_position,
      )
    except ValueError as e:
      raise InputError(str(e)) from None
  if vocab_size is not None:
    config = config.replace(vocab_size=vocab_size)
  return config


def check_shapes(source: torch_io.TorchSource, config: CodeGeeXConfig) -> list[str]:
  """Validates names and shapes of `source` against `config`; returns notes for the user."""
  expected = torch_shapes(config)
  missing = sorted(expected.keys() - source.shapes.keys())
  extra = sorted(source.shapes.keys() - expected.keys())
  if missing:
    raise CheckpointError(
      f"missing key {missing[0]}"
      + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
      + _describe(config)
    )
  if extra:
    raise CheckpointError(
      f"unexpected key {extra[0]}"
      + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
      + _describe(config)
    )
  notes = []
  for name, want in expected.items():
    got = source.shapes[name]
    if name == WORD_EMBEDDINGS and got[1:] == want[1:] and got[0] != want[0]:
      verb = "trimming" if got[0] > want[0] else "zero-padding"
      notes.append(
        f"word embeddings: {verb} {got[0]} -> {want[0]} rows to match vocab_size {want[0]}"
      )
      continue
    if got != want:
      hint = ""
      axis = table.split_axis(name)
      if (
        source.num_shards > 1
        and axis is not None
        and len(got) == len(want)
        and all(g == w for i, (g, w) in enumerate(zip(got, want)) if i != axis)
      ):
        hint = (
          f"; inconsistent shard count: {source.num_shards} shard files give dim {axis} = "
          f"{got[axis]}, the model needs {want[axis]}"
        )
      raise CheckpointError(
        f"wrong shape for {name}: {list(got)}, expected {list(want)}{hint or _describe(config)}"
      )
  return notes


def _describe(config: CodeGeeXConfig) -> str:
  return (
    f" (model: {config.num_layers}+1 layers, hidden {config.hidden_size}, "
    f"{config.num_heads} heads, ffn {config.ffn_size}, vocab {config.vocab_size}, "
    f"{config.max_position} positions)"
  )


def _fit_vocab(array: np.ndarray, rows: int) -> np.ndarray:
  if array.shape[0] > rows:
    return array[:rows]
  if array.shape[0] < rows:
    pad = np.zeros((rows - array.shape[0], *array.shape[1:]), array.dtype)
    return np.concatenate([array, pad])
  return array


def _source_tensor(
  source: torch_io.TorchSource,
  name: str,
  config: CodeGeeXConfig,
  consume: Callable[[np.ndarray], np.ndarray] = np.array,
) -> np.ndarray:
  """consume(released tensor `name` of the source, embedding fitted to the vocab)."""
  if name == WORD_EMBEDDINGS:
    return source.load(name, lambda a: consume(_fit_vocab(a, config.vocab_size)))
  return source.load(name, consume)


def _compiled(fn: Callable, config: CodeGeeXConfig, dtype: np.dtype) -> Callable:
  """run(array) = fn(array, config).astype(dtype) as a fresh C-contiguous numpy array.

  A table transform is a transpose and/or reshape. XLA does the transposes: its tiled
  transpose+convert (~1 GB/s per core, on every core) beats numpy's strided copy (~250 MB/s);
  each shape is compiled once (~0.1 s, see `_prepare`). A small tensor that is only reshaped
  needs just the cast, which numpy does without compiling anything. Both agree bit for bit
  except in NaN payloads (tested).
  """

  def run(array: np.ndarray) -> np.ndarray:
    return _converter(fn, config, np.dtype(dtype), array.shape, array.dtype)(array)

  return run


# Below this size a reshape-only transform is cast by numpy (one core, ~1 GB/s) rather than
# compiled: the biases and LayerNorms, not the embeddings.
_NUMPY_CAST_MAX_BYTES = 16 << 20

_converters: dict = {}  # (fn, config, dtype, shape, src dtype) -> Future of the converter
_converters_lock = threading.Lock()


def _converter(
  fn: Callable, config: CodeGeeXConfig, dtype: np.dtype, shape: tuple, src_dtype: np.dtype
) -> Callable:
  """The converter for one input shape, built once; threads asking for one being built wait."""
  key = (fn, config, np.dtype(dtype), tuple(shape), np.dtype(src_dtype))
  with _converters_lock:
    future = _converters.get(key)
    mine = future is None
    if mine:
      future = _converters[key] = concurrent.futures.Future()
  if mine:
    try:
      future.set_result(_build_converter(*key))
    except BaseException as e:
      future.set_exception(e)
  return future.result()


def _build_converter(fn, config, dtype, shape, src_dtype) -> Callable:
  spec = jax.ShapeDtypeStruct(shape, src_dtype)
  jaxpr = jax.make_jaxpr(lambda x: fn(x, config))(spec).jaxpr
  ops = [eqn.primitive.name for eqn in jaxpr.eqns]
  if set(ops) <= {"reshape"} and int(np.prod(shape)) * src_dtype.itemsize <= _NUMPY_CAST_MAX_BYTES:

    def cast(array: np.ndarray) -> np.ndarray:
      with np.errstate(invalid="ignore"):  # NaNs convert to NaNs, as in XLA, without a warning
        return fn(array, config).astype(dtype)  # numpy: views, then one copy

    return cast
  cpu = jax.devices("cpu")[0]  # on the CPU even if a GPU exists
  pre, post, xla_fn = shape, tuple(jaxpr.outvars[0].aval.shape), lambda x: fn(x, config)
  if ops.count("transpose") == 1 and set(ops) <= {"reshape", "transpose"} and _is_chain(jaxpr):
    # reshape* -> transpose -> reshape*: the reshapes of contiguous arrays are free in numpy,
    # while XLA transposes a 3-d view ~1.4-5x slower than the same bytes as a 2-d matrix
    # (x.T.reshape(heads, head_dim, d) vs x.T).
    transpose = jaxpr.eqns[ops.index("transpose")]
    pre = tuple(transpose.invars[0].aval.shape)
    xla_fn = functools.partial(jnp.transpose, axes=transpose.params["permutation"])
  on_cpu = jax.ShapeDtypeStruct(pre, src_dtype, sharding=jax.sharding.SingleDeviceSharding(cpu))
  compiled = jax.jit(lambda x: xla_fn(x).astype(dtype)).lower(on_cpu).compile()

  def run(array: np.ndarray) -> np.ndarray:
    # device_put does not copy an aligned array (a mapped tensor is), nor np.asarray the result.
    return np.asarray(compiled(jax.device_put(array.reshape(pre), cpu))).reshape(post)

  return run


def _is_chain(jaxpr) -> bool:
  """Whether each equation of `jaxpr` consumes the previous one's output (input to output)."""
  current = jaxpr.invars[0]
  for eqn in jaxpr.eqns:
    if list(eqn.invars) != [current]:
      return False
    current = eqn.outvars[0]
  return jaxpr.outvars == [current]


def _prepare(keys) -> None:
  """Builds the converters for `keys` ((fn, config, dtype, shape, src dtype), in the order
  they will be needed) on a background thread: XLA compiles (~0.4 s in all at 2.7B) while the
  conversion starts with what needs no compiling or was compiled first."""

  def build():
    for key in dict.fromkeys(keys):
      try:
        _converter(*key)
      except Exception:  # pylint: disable=broad-except
        pass  # kept in the future: whoever needs this converter raises it

  threading.Thread(target=build, name="geex-compile").start()


def _to_flax(source, name, transform, config, dtype) -> np.ndarray:
  """The flax array of released tensor `name`: transform, cast and make contiguous in one copy,
  straight from the mapped file."""
  return _source_tensor(source, name, config, _compiled(transform.to_flax, config, dtype))


# --- torch -> jax ----------------------------------------------------------------------------


def torch_to_jax(
  src: os.PathLike,
  dst: os.PathLike,
  *,
  dtype: str = "bf16",
  preset: Optional[str] = None,
  num_heads: Optional[int] = None,
  vocab_size: Optional[int] = None,
  scan_layers: bool = True,
  verify: bool = False,
  overwrite: bool = False,
  trust_pickle: bool = False,
  compress: bool = False,
  progress: Optional[bool] = None,
  notify: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
) -> Summary:
  """Converts a released checkpoint (file, fused-QKV file or mp_rank_XX shard directory) at SRC
  into a geex-jax params checkpoint at DST (config.json + params/). Either may be gs://."""
  dst = _dst_path(dst)
  np_dtype = _np_dtype(dtype, TORCH_TO_JAX_DTYPES)
  check_destination(dst, overwrite)  # before reading anything: fail fast
  with _local_source(src) as local_src:
    return _torch_to_jax(
      local_src,
      dst,
      np_dtype,
      preset=preset,
      num_heads=num_heads,
      vocab_size=vocab_size,
      scan_layers=scan_layers,
      verify=verify,
      overwrite=overwrite,
      trust_pickle=trust_pickle,
      compress=compress,
      progress=progress,
      notify=notify,
    )


def _torch_to_jax(
  src: pathlib.Path,
  dst,
  np_dtype: np.dtype,
  *,
  preset,
  num_heads,
  vocab_size,
  scan_layers,
  verify,
  overwrite,
  trust_pickle,
  compress,
  progress,
  notify,
) -> Summary:
  start = time.perf_counter()
  source = torch_io.TorchSource(src, trust_pickle=trust_pickle)
  config = infer_config(source.shapes, preset=preset, num_heads=num_heads, vocab_size=vocab_size)
  for note in check_shapes(source, config):
    notify(note)
  config = config.replace(param_dtype=np_dtype.name, scan_layers=scan_layers)
  shapes = flax_shapes(config)
  source_shapes = torch_shapes(config)  # embedding fitted to the vocab, as consume sees it
  _prepare(
    [
      (transform.to_flax, config, np_dtype, source_shapes[name], source.dtype)
      for name, _, transform in table.rows(config)
    ]
  )

  pieces: dict[str, list] = {}
  for torch_name, flax_path, transform in table.rows(config):
    path, index = table.scanned_path(flax_path) if scan_layers else (flax_path, None)
    pieces.setdefault(path, []).append(
      (
        index,
        functools.partial(_to_flax, source, torch_name, transform, config, np_dtype),
        shapes[flax_path],
      )
    )
  tree: dict = {}
  for path, items in pieces.items():
    shape = items[0][2] if items[0][0] is None else (len(items), *items[0][2])
    table.set_path(
      tree, path, checkpoints.LazyArray(shape, np_dtype, tuple((i, p) for i, p, _ in items))
    )
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))

  with staged(dst, overwrite) as stage:
    with _progress(total, "torch->jax", progress) as bar:
      checkpoints.save_params_streaming(stage, config, tree, compress=compress, on_bytes=bar.update)
    seconds, rss = time.perf_counter() - start, peak_rss()
    summary = Summary(
      "torch-to-jax",
      dst,
      len(list(table.rows(config))),
      total,
      np_dtype.name,
      seconds,
      rss,
      max(source.nbytes, total),
    )
    if verify:
      summary.verify = verify_torch_to_jax(source, stage, config)
    if fileio.is_url(dst):
      checkpoints.mark_committed(stage)  # what Orbax looks for on GCS
  return summary


def _np_dtype(name: str, allowed) -> np.dtype:
  if name not in allowed:
    raise InputError(f"unsupported --dtype {name!r}; use one of {', '.join(allowed)}")
  return np.dtype(as_dtype(name))


# --- jax -> torch ----------------------------------------------------------------------------


def _stored_leaf(stored: checkpoints.StoredParams, flax_path: str) -> tuple[tuple, Optional[int]]:
  """(stored leaf key, layer index or None) of an unscanned flax path, in the stored layout."""
  scanned = any(keys[0] == "layers" for keys in stored.leaves)
  path, index = table.scanned_path(flax_path) if scanned else (flax_path, None)
  return tuple(path.split("/")), index


def _stored_reader(stored: checkpoints.StoredParams, config: CodeGeeXConfig):
  """Checks the stored leaves against `config`; returns read(flax_path) -> future array."""
  want: dict[tuple, tuple] = {}
  for path, shape in flax_shapes(config).items():
    keys, index = _stored_leaf(stored, path)
    want[keys] = shape if index is None else (config.num_layers, *shape)
  if set(want) != set(stored.leaves):
    diff = sorted("/".join(k) for k in set(want).symmetric_difference(stored.leaves))
    raise CheckpointError(
      f"{stored.path} does not match its config.json: leaves differ at {diff[:3]}"
    )
  for keys, shape in want.items():
    got = tuple(stored.leaves[keys].shape)
    if got != shape:
      raise CheckpointError(
        f"{stored.path}: {'/'.join(keys)} has shape {list(got)}, config.json implies {list(shape)}"
      )

  def read(flax_path: str):
    """Starts reading a leaf (or one layer of it); `.result()` is the numpy array."""
    return stored.read_async(*_stored_leaf(stored, flax_path))

  return read


def _stored_dtype(stored: checkpoints.StoredParams, flax_path: str) -> np.dtype:
  return np.dtype(stored.leaves[_stored_leaf(stored, flax_path)[0]].dtype.numpy_dtype)


def jax_to_torch(
  src: os.PathLike,
  dst: os.PathLike,
  *,
  dtype: str = "fp16",
  shards: int = 1,
  verify: bool = False,
  overwrite: bool = False,
  progress: Optional[bool] = None,
) -> Summary:
  """Converts a geex-jax checkpoint (params-only, run dir or step dir) at SRC to the released
  layout: one file DST, or with shards > 1 a directory DST of mp_rank_XX_model_states.pt. Either
  may be gs:// (a gs:// SRC is read in place, through TensorStore)."""
  dst = _dst_path(dst)
  np_dtype = _np_dtype(dtype, JAX_TO_TORCH_DTYPES)
  if shards < 1:
    raise InputError(f"--shards must be >= 1, got {shards}")
  check_destination(dst, overwrite)
  start = time.perf_counter()
  stored = checkpoints.StoredParams(src)
  config = stored.config
  read = _stored_reader(stored, config)
  shapes = torch_shapes(config)
  if shards > 1:
    if config.num_heads % shards:
      raise InputError(f"cannot split {config.num_heads} attention heads into {shards} shards")
    for name, shape in shapes.items():
      axis = table.split_axis(name)
      if axis is not None and shape[axis] % shards:
        raise InputError(f"cannot split {name} {list(shape)} into {shards} shards on dim {axis}")

  def part_shape(name, shape):
    axis = table.split_axis(name) if shards > 1 else None
    if axis is None:
      return shape
    return tuple(s // shards if i == axis else s for i, s in enumerate(shape))

  layouts = [
    table.nest_released(
      {n: torch_io.placeholder(part_shape(n, s), np_dtype) for n, s in shapes.items()}
    )
    for _ in range(shards)
  ]
  transforms = {t: (f, tr) for t, f, tr in table.rows(config)}
  sizes = {name: int(np.prod(s)) * np_dtype.itemsize for name, s in shapes.items()}
  total = sum(sizes.values())
  stored_shapes = flax_shapes(config)
  _prepare(
    [
      (
        transform.to_torch,
        config,
        np_dtype,
        stored_shapes[flax_path],
        _stored_dtype(stored, flax_path),
      )
      for _, flax_path, transform in table.rows(config)
    ]
  )

  def produce(name: str, fetched=None) -> np.ndarray:
    flax_path, transform = transforms[name]
    array = (fetched if fetched is not None else read(flax_path)).result()
    return _compiled(transform.to_torch, config, np_dtype)(array)

  with staged(dst, overwrite) as stage:
    if shards == 1:
      paths = [stage]
    else:
      stage.mkdir()
      paths = [stage / torch_io.shard_name(r) for r in range(shards)]
    writers = [torch_io.TorchZipWriter(p, layout) for p, layout in zip(paths, layouts)]
    # Every writer pickled the same nesting, so all expect tensors in the same name order.
    names = _leaf_names(table.nest_released(dict.fromkeys(shapes)))

    def write(name: str, array: np.ndarray) -> None:
      axis = table.split_axis(name) if shards > 1 else None
      # Views: a part split on dim 0 is written without a copy.
      parts = [array] * shards if axis is None else np.split(array, shards, axis=axis)
      for writer, part in zip(writers, parts):
        writer.write(part)
      bar.update(array.nbytes)
      for path in paths:
        syncs.sync(path)  # the disk writes the growing files while the conversion goes on

    with _progress(total, "jax->torch", progress) as bar:
      try:
        with streaming.BackgroundSync() as syncs:
          # One writer: each file's tensors go in pickling order.
          streaming.run(
            names,
            start=lambda name: read(transforms[name][0]),
            produce=produce,
            write=write,
            nbytes=lambda name: sizes[name],
          )
      except BaseException:
        for writer in writers:
          writer.abandon()
        raise
    for writer, path in zip(writers, paths):
      writer.close()
      fileio.fsync_path(path)  # durable before the rename publishes it
    seconds, rss = time.perf_counter() - start, peak_rss()
    written = sum(os.path.getsize(p) for p in paths)
    summary = Summary(
      "jax-to-torch", dst, len(shapes), total, np_dtype.name, seconds, rss, max(written, total)
    )
    if verify:
      summary.verify = verify_jax_to_torch(stage, read, config, produce)
  return summary


def _leaf_names(nested: dict) -> list[str]:
  """Released names in the depth-first order torch.save pickles the released nesting."""
  lm = nested["module"]["language_model"]
  names = []
  for group, modules in lm.items():
    if group == "transformer":
      names += [f"transformer.{k}" for k in modules]
    else:
      names += [f"{group}.{m}.{p}" for m, params in modules.items() for p in params]
  return names


# --- verification ----------------------------------------------------------------------------

_PROMPT_LEN = 16


def _logits_diff(config: CodeGeeXConfig, flat_fp32: dict[str, np.ndarray], params) -> float:
  """Max |logits(torch reference) - logits(JAX)| on a fixed prompt, both in fp32."""
  import torch
  import jax.numpy as jnp
  from geex_jax.conversion.torch_reference import CodeGeeXTorch
  from geex_jax.model.codegeex import CodeGeeX

  cfg = config.replace(dtype="float32", param_dtype="float32", dropout_rate=0.0)
  tokens = np.random.RandomState(0).randint(
    0, min(cfg.vocab_size, 50400), size=(1, min(_PROMPT_LEN, cfg.max_position))
  )
  ref = CodeGeeXTorch(cfg.replace(scan_layers=False)).eval()
  try:
    ref.load_released({k: torch.from_numpy(v) for k, v in flat_fp32.items()}, strict=True)
  except RuntimeError as e:
    raise CheckpointError(
      f"verify: the PyTorch reference rejects the weights: {str(e).splitlines()[0]}"
    ) from None
  with torch.no_grad():
    expected = ref(torch.from_numpy(tokens))[0].numpy()
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  got = np.asarray(CodeGeeX(cfg).apply({"params": params}, jnp.asarray(tokens)))
  return float(np.abs(got - expected).max())


def _check_logits(diff: float) -> str:
  if not diff <= 1e-4:
    raise CheckpointError(
      f"verify failed: logits of JAX and the PyTorch reference differ by {diff:.3g} (> 1e-4)"
    )
  return f"logits of JAX and the PyTorch reference agree (max abs diff {diff:.2e} <= 1e-4)"


def _sample_rows(config: CodeGeeXConfig) -> list[str]:
  last = config.num_layers - 1
  wanted = [
    WORD_EMBEDDINGS,
    "topQueryEmbedding.top_query_embeddings.weight",
    "transformer.layers.0.attention.query.weight",
    f"transformer.layers.{last // 2}.mlp.dense_h_to_4h.weight",
    f"transformer.layers.{last}.attention.dense.weight",
    f"transformer.layers.{last}.input_layernorm.bias",
    "transformer.topQueryLayer.attention.value.weight",
    "transformer.topQueryLayer.mlp.dense_4h_to_h.weight",
    "transformer.final_layernorm.weight",
  ]
  names = {t for t, _, _ in table.rows(config)}
  return [n for n in wanted if n in names]


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def verify_torch_to_jax(
  source: torch_io.TorchSource, stage: pathlib.Path, config: CodeGeeXConfig
) -> str:
  """Small models: same logits from the reference (fed the source weights rounded to the stored
  dtype) and from the written checkpoint. Large: a sample of tensors compared bit for bit."""
  stored_dtype = np.dtype(as_dtype(config.param_dtype))
  if config.num_params() <= VERIFY_LOGITS_MAX_PARAMS:
    flat = {
      name: _source_tensor(
        source, name, config, lambda a: a.astype(stored_dtype).astype(np.float32)
      )
      for name, _, _ in table.rows(config)
    }
    _, params = checkpoints.load_params(stage, scan_layers=config.scan_layers)
    return _check_logits(_logits_diff(config, flat, params))
  read = _stored_reader(checkpoints.StoredParams(stage), config)
  rows = {t: (f, tr) for t, f, tr in table.rows(config)}
  sample = _sample_rows(config)
  for name in sample:
    flax_path, transform = rows[name]
    want = _to_flax(source, name, transform, config, stored_dtype)
    if not _bits_equal(read(flax_path).result(), want):
      raise CheckpointError(f"verify failed: {name} differs from the source after conversion")
  return f"{len(sample)} sampled tensors are bit-identical to the source"


def verify_jax_to_torch(stage: pathlib.Path, read, config: CodeGeeXConfig, produce) -> str:
  """Reads the written file(s) back; small models: logits of the reference loaded from them with
  strict=True vs JAX on the source params; large: sampled tensors bit for bit."""
  written = torch_io.TorchSource(stage)
  if config.num_params() <= VERIFY_LOGITS_MAX_PARAMS:
    flat = {name: written.load(name).astype(np.float32) for name in written.shapes}
    out_dtype = written.dtype
    params: dict = {}
    for name, flax_path, _ in table.rows(config):
      # JAX runs on the source params rounded like the written file, so only the conversion is
      # compared, not the rounding.
      array = read(flax_path).result().astype(out_dtype).astype(np.float32)
      table.set_path(params, flax_path, array)
    return _check_logits(_logits_diff(config.replace(scan_layers=False), flat, params))
  sample = _sample_rows(config)
  for name in sample:
    if not _bits_equal(written.load(name), produce(name)):
      raise CheckpointError(f"verify failed: {name} differs from the source after conversion")
  return f"{len(sample)} sampled tensors are bit-identical to the source"
