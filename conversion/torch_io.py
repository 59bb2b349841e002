"""Streaming access to released-layout PyTorch checkpoints: read them lazily, write them per tensor.

Reading: `TorchSource` opens a single file or a directory of `mp_rank_XX_model_states.pt` shards
with `torch.load(mmap=True, weights_only=True)`, validates the nesting, names and shard structure
from metadata alone (no tensor data is touched), and then hands out one canonical released tensor
at a time (fused Q/K/V split apart, model-parallel parts merged per `table.SPLIT_RULES`). The
mapped pages of a tensor are dropped again once it has been copied, so the process's resident set
stays about one tensor large however big the file is.

Writing: `TorchZipWriter` writes the same zip format as `torch.save` (identical `data.pkl`, one
record per storage) but pickles placeholders first and produces each tensor's bytes only when its
record is written, so a state dict never has to exist in memory.
"""
from __future__ import annotations

import collections
import ctypes
import io
import mmap
import os
import pathlib
import pickle
import re
import sys
import warnings
from typing import Callable, Sequence

import ml_dtypes
import numpy as np
import torch

from conversion import table
from geex_jax.errors import CheckpointError, InputError

SHARD_PATTERN = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_ZIP_MAGIC = b"PK\x03\x04"

# torch dtype <-> numpy dtype (bf16 through ml_dtypes, numpy has none of its own).
_NUMPY = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
          torch.bfloat16: np.dtype(ml_dtypes.bfloat16)}
_TORCH = {v: k for k, v in _NUMPY.items()}
# The storage classes torch.save pickles for each dtype (`TypedStorage._pickle_storage_type`).
_STORAGE_TYPE = {torch.float32: "FloatStorage", torch.float16: "HalfStorage",
                 torch.bfloat16: "BFloat16Storage"}


def shard_name(rank: int) -> str:
  return f"mp_rank_{rank:02d}_model_states.pt"


# --- reading ---------------------------------------------------------------------------------


def _load(path: pathlib.Path, trust_pickle: bool):
  if not path.is_file():
    raise InputError(f"{path}: no such file")
  with open(path, "rb") as f:
    head = f.read(4)
  if head != _ZIP_MAGIC:
    raise InputError(f"{path} is not a PyTorch checkpoint (no torch.save zip header; files from "
                     "torch < 1.6 must be re-saved with a newer torch first)")
  try:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=not trust_pickle)
  except pickle.UnpicklingError as e:
    if "weights_only" in str(e) or "Unsupported global" in str(e):
      raise InputError(f"{path} holds Python objects besides tensors (e.g. training args); "
                       "pass --trust-pickle to load it anyway, only if you trust the file"
                       ) from None
    raise InputError(f"{path} is not a valid PyTorch checkpoint: {_first_line(e)}") from None
  except RuntimeError as e:
    if "central directory" in str(e) or "zip archive" in str(e):
      raise InputError(f"{path} is truncated or damaged (its zip directory cannot be read): "
                       f"{_first_line(e)}") from None
    raise InputError(f"{path} cannot be read as a PyTorch checkpoint: {_first_line(e)}"
                     ) from None
  except (EOFError, ValueError, OSError) as e:
    raise InputError(f"{path} is truncated or damaged: {type(e).__name__}: {_first_line(e)}"
                     ) from None


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _flatten(checkpoint, path: pathlib.Path) -> dict[str, torch.Tensor]:
  """The released nesting -> {released name: tensor}, rejecting anything else in it."""
  def child(node, key, where):
    if not isinstance(node, dict) or key not in node:
      got = sorted(map(str, node))[:6] if isinstance(node, dict) else type(node).__name__
      raise CheckpointError(f"{path}: wrong nesting: expected key {where}{key!r}, found {got}")
    return node[key]

  lm = child(child(checkpoint, "module", ""), "language_model", "['module']")
  if not isinstance(lm, dict):
    raise CheckpointError(f"{path}: wrong nesting: ['module']['language_model'] is a "
                          f"{type(lm).__name__}, expected a dict")
  extra = set(lm) - {"embedding", "topQueryEmbedding", "transformer"}
  if extra:
    raise CheckpointError(f"{path}: unexpected entries in ['module']['language_model']: "
                          f"{sorted(map(str, extra))}")
  flat: dict[str, torch.Tensor] = {}

  def add(name, value):
    if not isinstance(value, torch.Tensor):
      raise CheckpointError(f"{path}: wrong nesting: {name} is a {type(value).__name__}, "
                            "expected a tensor")
    flat[name] = value

  for group in ("embedding", "topQueryEmbedding"):
    modules = lm.get(group, {})
    if not isinstance(modules, dict):
      raise CheckpointError(f"{path}: wrong nesting: {group} is a {type(modules).__name__}")
    for module, params in modules.items():
      if not isinstance(params, dict):
        raise CheckpointError(f"{path}: wrong nesting: {group}.{module} is a "
                              f"{type(params).__name__}, expected a dict of tensors")
      for param, value in params.items():
        add(f"{group}.{module}.{param}", value)
  transformer = lm.get("transformer", {})
  if not isinstance(transformer, dict):
    raise CheckpointError(f"{path}: wrong nesting: transformer is a {type(transformer).__name__}")
  for name, value in transformer.items():
    add(f"transformer.{name}", value)
  return flat


def to_numpy(t: torch.Tensor) -> np.ndarray:
  """A numpy view of a CPU tensor (no copy), bf16 included."""
  if t.dtype == torch.bfloat16:
    return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
  if t.dtype not in _NUMPY:
    raise CheckpointError(f"unsupported tensor dtype {t.dtype} (expected fp32, fp16 or bf16)")
  return t.numpy()


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def _release(t: torch.Tensor) -> None:
  """Drops the resident pages of a memory-mapped tensor (they are re-read from the file if
  touched again). Without this the mapped file would stay resident and count as our RSS."""
  if _libc is None or t.numel() == 0:
    return
  start = t.data_ptr()
  end = start + t.numel() * t.element_size()
  start -= start % _PAGE
  _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


class _Part:
  """Where one shard's part of a canonical tensor lives: a stored tensor, or a dim-0 slice of a
  fused one."""
  __slots__ = ("tensor", "piece", "pieces")

  def __init__(self, tensor: torch.Tensor, piece: int = 0, pieces: int = 1):
    self.tensor, self.piece, self.pieces = tensor, piece, pieces

  @property
  def shape(self) -> tuple:
    rows = self.tensor.shape[0] // self.pieces
    return (rows, *self.tensor.shape[1:])

  def view(self) -> torch.Tensor:
    rows = self.tensor.shape[0] // self.pieces
    return self.tensor[self.piece * rows:(self.piece + 1) * rows]


class TorchSource:
  """A released checkpoint (one file or model-parallel shards), read one tensor at a time.

  After construction `shapes` maps every canonical released name (unfused, merged) to its full
  shape; `load(name)` returns that tensor as a numpy array.
  """

  def __init__(self, src: os.PathLike, *, trust_pickle: bool = False):
    src = pathlib.Path(src)
    if not src.exists():
      raise InputError(f"{src}: no such file or directory")
    if src.is_dir():
      self.files = self._shard_files(src)
    else:
      self.files = [src]
    self.flats = [_flatten(_load(f, trust_pickle), f) for f in self.files]
    self.parts = [self._unfuse(flat, f) for flat, f in zip(self.flats, self.files)]
    names = set(self.parts[0])
    for rank, parts in enumerate(self.parts[1:], 1):
      if set(parts) != names:
        diff = sorted(names.symmetric_difference(parts))[:3]
        raise CheckpointError(f"inconsistent shards: {self.files[rank].name} and "
                              f"{self.files[0].name} hold different tensors (e.g. {diff})")
    self.shapes = {name: self._merged_shape(name) for name in sorted(names)}
    self.dtype = next(iter(self.flats[0].values())).dtype if self.flats[0] else torch.float32

  @property
  def num_shards(self) -> int:
    return len(self.files)

  @property
  def nbytes(self) -> int:
    return sum(os.path.getsize(f) for f in self.files)

  @staticmethod
  def _shard_files(directory: pathlib.Path) -> list[pathlib.Path]:
    ranks = {}
    for p in directory.iterdir():
      m = SHARD_PATTERN.match(p.name)
      if m:
        ranks[int(m.group(1))] = p
    if not ranks:
      raise InputError(f"{directory} holds no mp_rank_XX_model_states.pt shard files")
    missing = [shard_name(r) for r in range(max(ranks) + 1) if r not in ranks]
    if missing:
      raise CheckpointError(f"inconsistent shard count in {directory}: found ranks "
                            f"{sorted(ranks)}, missing {missing}")
    return [ranks[r] for r in range(len(ranks))]

  @staticmethod
  def _unfuse(flat: dict, path: pathlib.Path) -> dict[str, _Part]:
    parts: dict[str, _Part] = {}
    for name, tensor in flat.items():
      unfused = table.fused_parts(name)
      if unfused is None:
        parts[name] = _Part(tensor)
        continue
      if tensor.ndim == 0 or tensor.shape[0] % len(unfused):
        raise CheckpointError(f"{path}: fused tensor {name} of shape {list(tensor.shape)} does "
                              f"not split into {len(unfused)} equal parts on dim 0")
      for i, part in enumerate(unfused):
        if part in flat:
          raise CheckpointError(f"{path}: {part} is stored both fused and separately")
        parts[part] = _Part(tensor, i, len(unfused))
    return parts

  def _merged_shape(self, name: str) -> tuple:
    shapes = [tuple(parts[name].shape) for parts in self.parts]
    if self.num_shards == 1:
      return shapes[0]
    try:
      axis = table.split_axis(name)
    except KeyError:
      return shapes[0]  # an unknown name; the key check reports it
    if any(s != shapes[0] for s in shapes):
      raise CheckpointError(
          f"inconsistent shards: {name} has shapes {[list(s) for s in shapes]} in "
          f"{[f.name for f in self.files]}")
    if axis is None:
      return shapes[0]
    merged = list(shapes[0])
    merged[axis] *= self.num_shards
    return tuple(merged)

  def load(self, name: str, consume: Callable[[np.ndarray], np.ndarray] = np.array
             ) -> np.ndarray:
    """Returns consume(tensor `name`), the tensor being a numpy array in the stored dtype.

    From a single file the array is a view of the mapped file (no copy), valid only during
    `consume`, which must copy what it keeps (the default, np.array, copies it all). Afterwards
    the mapped pages are dropped from this process.
    """
    views = [parts[name].view() for parts in self.parts]
    axis = table.split_axis(name) if self.num_shards > 1 else None
    try:
      if axis is None:
        return consume(to_numpy(views[0]))
      return consume(np.concatenate([to_numpy(v) for v in views], axis=axis))
    finally:
      for v in views:
        _release(v)


# --- writing ---------------------------------------------------------------------------------


class _Storage:
  __slots__ = ("dtype", "numel", "key")

  def __init__(self, dtype: torch.dtype, numel: int):
    self.dtype, self.numel, self.key = dtype, numel, None


class _TensorPlaceholder:
  """Pickles exactly like a contiguous CPU tensor would under torch.save."""

  def __init__(self, shape: Sequence[int], dtype: torch.dtype):
    self.shape = tuple(int(s) for s in shape)
    self.storage = _Storage(dtype, int(np.prod(self.shape)))

  def __reduce_ex__(self, protocol):
    stride, acc = [], 1
    for s in reversed(self.shape):
      stride.append(acc)
      acc *= s
    return (torch._utils._rebuild_tensor_v2,
            (self.storage, 0, self.shape, tuple(reversed(stride)), False,
             collections.OrderedDict()))


class TorchZipWriter:
  """Writes `obj` (nested dicts whose leaves are (shape, torch dtype) placeholders) in torch.save's
  zip format, then accepts each tensor's data in pickling order via `write(array)`.

  Uses torch's own zip writer (`torch._C.PyTorchFileWriter`, what torch.save uses) so records get
  the same alignment and CRCs; `torch.load` (mmap or not) reads the result.
  """

  def __init__(self, path: os.PathLike, obj):
    self.order: list[_TensorPlaceholder] = []
    counter = iter(range(1 << 62))

    def persistent_id(o):
      if isinstance(o, _Storage):
        o.key = str(next(counter))
        return ("storage", getattr(torch, _STORAGE_TYPE[o.dtype]), o.key, "cpu", o.numel)
      return None

    def collect(node):
      if isinstance(node, dict):
        for v in node.values():
          collect(v)
      elif isinstance(node, _TensorPlaceholder):
        self.order.append(node)
      else:
        raise TypeError(f"not a dict or placeholder: {type(node).__name__}")

    collect(obj)
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=2)  # torch.serialization.DEFAULT_PROTOCOL
    pickler.persistent_id = persistent_id
    pickler.dump(obj)
    # Storage keys follow pickling order (dict insertion order, depth first), which is the order
    # `collect` walked and so the order write() expects data in.
    if [p.storage.key for p in self.order] != [str(i) for i in range(len(self.order))]:
      raise AssertionError("storage keys do not follow the collected order")
    self._writer = torch._C.PyTorchFileWriter(
        str(path), torch.serialization.get_crc32_options(),
        torch.serialization._get_storage_alignment())
    data = buf.getvalue()
    self._writer.write_record("data.pkl", data, len(data))
    self._writer.write_record(".format_version", "1", 1)
    alignment = str(torch.serialization._get_storage_alignment())
    self._writer.write_record(".storage_alignment", alignment, len(alignment))
    self._writer.write_record("byteorder", sys.byteorder, len(sys.byteorder))
    self._next = 0

  def write(self, array: np.ndarray) -> None:
    placeholder = self.order[self._next]
    want = (placeholder.shape, _NUMPY[placeholder.storage.dtype])
    if (array.shape, array.dtype) != want:
      raise CheckpointError(f"tensor {self._next}: got {array.dtype}{list(array.shape)}, "
                            f"expected {want[1]}{list(want[0])}")
    array = np.ascontiguousarray(array)
    with warnings.catch_warnings():
      # A read-only array (e.g. a view of a JAX buffer) is fine: the writer only reads it.
      warnings.filterwarnings("ignore", message=".*not writable.*")
      # A uint8 view shares the buffer: the record is written straight from it, no copy.
      storage = torch.from_numpy(array.reshape(-1).view(np.uint8)).untyped_storage()
    self._writer.write_record(f"data/{placeholder.storage.key}", storage, array.nbytes)
    self._next += 1

  def close(self) -> None:
    if self._next != len(self.order):
      raise CheckpointError(f"wrote {self._next} of {len(self.order)} tensors")
    self._writer.write_end_of_file()


def placeholder(shape: Sequence[int], dtype: torch.dtype) -> _TensorPlaceholder:
  return _TensorPlaceholder(shape, dtype)


def torch_dtype(dtype) -> torch.dtype:
  return _TORCH[np.dtype(dtype)]


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
  return _NUMPY[dtype]
