"""Streaming access to released-layout PyTorch checkpoints: read them lazily, write them per tensor.

Reading: `TorchSource` opens a single file or a directory of `mp_rank_XX_model_states.pt` shards
with `torch.load(mmap=True, weights_only=True)`, validates the nesting, names and shard structure
from metadata alone (no tensor data is touched), and then hands out one canonical released tensor
at a time (fused Q/K/V split apart, model-parallel parts merged per `table.SPLIT_RULES`). The
mapped pages of a tensor are dropped again once it has been copied, so the process's resident set
stays about one tensor large however big the file is.

Writing: `TorchZipWriter` writes the same zip format as `torch.save` (identical `data.pkl`, one
aligned record per storage) but pickles placeholders first and produces each tensor's bytes only
when its record is written, so a state dict never has to exist in memory. It does not need torch
(torch has no per-tensor streaming writer): jax-to-torch never imports it (about a second, an
eighth of a 2.7B conversion).
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import io
import mmap
import os
import pathlib
import pickle
import re
import struct
import sys
import uuid
import zlib
from typing import Callable, Sequence

import ml_dtypes
import numpy as np

from geex_jax.conversion import table
from geex_jax.errors import CheckpointError, InputError

SHARD_PATTERN = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
_ZIP_MAGIC = b"PK\x03\x04"

# The storage classes torch.save pickles for each dtype (`TypedStorage._pickle_storage_type`).
_STORAGE_DTYPES = {
  "FloatStorage": np.dtype(np.float32),
  "HalfStorage": np.dtype(np.float16),
  "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
}
_STORAGE_TYPE = {v: k for k, v in _STORAGE_DTYPES.items()}
_TORCH_NAMES = {
  "torch.float32": "float32",
  "torch.float16": "float16",
  "torch.bfloat16": "bfloat16",
}


def shard_name(rank: int) -> str:
  return f"mp_rank_{rank:02d}_model_states.pt"


def numpy_dtype(dtype) -> np.dtype:
  """The numpy dtype of a torch dtype (bf16 through ml_dtypes) or of anything numpy takes."""
  name = _TORCH_NAMES.get(str(dtype))
  if name is None and str(dtype).startswith("torch."):
    raise CheckpointError(f"unsupported tensor dtype {dtype} (expected fp32, fp16 or bf16)")
  return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name or dtype)


# --- reading ---------------------------------------------------------------------------------


def _load(path: pathlib.Path, trust_pickle: bool):
  if not path.is_file():
    raise InputError(f"{path}: no such file")
  with open(path, "rb") as f:
    head = f.read(4)
  if head != _ZIP_MAGIC:
    raise InputError(
      f"{path} is not a PyTorch checkpoint (no torch.save zip header; files from "
      "torch < 1.6 must be re-saved with a newer torch first)"
    )
  import torch  # imported here: writing a .pt file (jax-to-torch) does not need it

  try:
    return torch.load(path, map_location="cpu", mmap=True, weights_only=not trust_pickle)
  except pickle.UnpicklingError as e:
    if "weights_only" in str(e) or "Unsupported global" in str(e):
      raise InputError(
        f"{path} holds Python objects besides tensors (e.g. training args); "
        "pass --trust-pickle to load it anyway, only if you trust the file"
      ) from None
    raise InputError(f"{path} is not a valid PyTorch checkpoint: {_first_line(e)}") from None
  except RuntimeError as e:
    if "central directory" in str(e) or "zip archive" in str(e):
      raise InputError(
        f"{path} is truncated or damaged (its zip directory cannot be read): {_first_line(e)}"
      ) from None
    raise InputError(f"{path} cannot be read as a PyTorch checkpoint: {_first_line(e)}") from None
  except (EOFError, ValueError, OSError) as e:
    raise InputError(
      f"{path} is truncated or damaged: {type(e).__name__}: {_first_line(e)}"
    ) from None


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def _flatten(checkpoint, path: pathlib.Path) -> dict:
  """The released nesting -> {released name: tensor}, rejecting anything else in it."""

  def child(node, key, where):
    if not isinstance(node, dict) or key not in node:
      got = sorted(map(str, node))[:6] if isinstance(node, dict) else type(node).__name__
      raise CheckpointError(f"{path}: wrong nesting: expected key {where}{key!r}, found {got}")
    return node[key]

  lm = child(child(checkpoint, "module", ""), "language_model", "['module']")
  if not isinstance(lm, dict):
    raise CheckpointError(
      f"{path}: wrong nesting: ['module']['language_model'] is a "
      f"{type(lm).__name__}, expected a dict"
    )
  extra = set(lm) - {"embedding", "topQueryEmbedding", "transformer"}
  if extra:
    raise CheckpointError(
      f"{path}: unexpected entries in ['module']['language_model']: {sorted(map(str, extra))}"
    )
  flat: dict = {}

  def add(name, value):
    if not _is_tensor(value):
      raise CheckpointError(
        f"{path}: wrong nesting: {name} is a {type(value).__name__}, expected a tensor"
      )
    flat[name] = value

  for group in ("embedding", "topQueryEmbedding"):
    modules = lm.get(group, {})
    if not isinstance(modules, dict):
      raise CheckpointError(f"{path}: wrong nesting: {group} is a {type(modules).__name__}")
    for module, params in modules.items():
      if not isinstance(params, dict):
        raise CheckpointError(
          f"{path}: wrong nesting: {group}.{module} is a "
          f"{type(params).__name__}, expected a dict of tensors"
        )
      for param, value in params.items():
        add(f"{group}.{module}.{param}", value)
  transformer = lm.get("transformer", {})
  if not isinstance(transformer, dict):
    raise CheckpointError(f"{path}: wrong nesting: transformer is a {type(transformer).__name__}")
  for name, value in transformer.items():
    add(f"transformer.{name}", value)
  return flat


def _is_tensor(value) -> bool:
  import torch  # already imported by _load

  return isinstance(value, torch.Tensor)


def to_numpy(t) -> np.ndarray:
  """A numpy view of a CPU torch tensor (no copy), bf16 included."""
  dtype = numpy_dtype(t.dtype)
  if dtype == np.dtype(ml_dtypes.bfloat16):
    import torch

    return t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4


def _release(array: np.ndarray) -> None:
  """Drops the resident pages of a memory-mapped tensor (they are re-read from the file if
  touched again). Without this the mapped file would stay resident and count as our RSS."""
  if _libc is None or array.size == 0:
    return
  start = array.__array_interface__["data"][0]
  end = start + array.size * array.itemsize  # a dense view's bytes (else a harmless guess)
  start -= start % _PAGE
  _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


class _Part:
  """Where one shard's part of a canonical tensor lives: a stored tensor, or a dim-0 slice of a
  fused one."""

  __slots__ = ("tensor", "piece", "pieces")

  def __init__(self, tensor, piece: int = 0, pieces: int = 1):
    self.tensor, self.piece, self.pieces = tensor, piece, pieces

  @property
  def shape(self) -> tuple:
    rows = self.tensor.shape[0] // self.pieces
    return (rows, *self.tensor.shape[1:])

  def view(self):
    rows = self.tensor.shape[0] // self.pieces
    return self.tensor[self.piece * rows : (self.piece + 1) * rows]


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
        raise CheckpointError(
          f"inconsistent shards: {self.files[rank].name} and "
          f"{self.files[0].name} hold different tensors (e.g. {diff})"
        )
    self.shapes = {name: self._merged_shape(name) for name in sorted(names)}

  @property
  def dtype(self) -> np.dtype:
    """The (numpy) dtype of the first tensor."""
    first = next(iter(self.flats[0].values()), None)
    return np.dtype(np.float32) if first is None else to_numpy(first).dtype

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
      raise CheckpointError(
        f"inconsistent shard count in {directory}: found ranks {sorted(ranks)}, missing {missing}"
      )
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
        raise CheckpointError(
          f"{path}: fused tensor {name} of shape {list(tensor.shape)} does "
          f"not split into {len(unfused)} equal parts on dim 0"
        )
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
        f"{[f.name for f in self.files]}"
      )
    if axis is None:
      return shapes[0]
    merged = list(shapes[0])
    merged[axis] *= self.num_shards
    return tuple(merged)

  def load(self, name: str, consume: Callable[[np.ndarray], np.ndarray] = np.array) -> np.ndarray:
    """Returns consume(tensor `name`), the tensor being a numpy array in the stored dtype.

    From a single file the array is a view of the mapped file (no copy), valid only during
    `consume`, which must copy what it keeps (the default, np.array, copies it all). Afterwards
    the mapped pages are dropped from this process.
    """
    views = [to_numpy(parts[name].view()) for parts in self.parts]
    axis = table.split_axis(name) if self.num_shards > 1 else None
    try:
      if axis is None:
        return consume(views[0])
      return consume(np.concatenate(views, axis=axis))
    finally:
      for v in views:
        _release(v)


# --- writing ---------------------------------------------------------------------------------


class _Storage:
  __slots__ = ("dtype", "numel", "key")

  def __init__(self, dtype: np.dtype, numel: int):
    self.dtype, self.numel, self.key = dtype, numel, None


class _Global:
  """A module attribute pickled by reference (`torch._utils._rebuild_tensor_v2`), without
  importing the module as pickle would to check that the name resolves."""

  def __init__(self, module: str, name: str):
    self.module, self.name = module, name

  def __call__(self, *args):  # pickle wants a reduce function to be callable; never called
    raise TypeError(f"{self.module}.{self.name} is a pickling stand-in")


_REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
_STORAGE_CLASSES = {dtype: _Global("torch", name) for dtype, name in _STORAGE_TYPE.items()}


class _Pickler(pickle._Pickler):
  """The pure-Python pickler (its output is byte-identical to the C one's) taught to write a
  `_Global` as the GLOBAL opcode the real object would give."""

  dispatch = dict(pickle._Pickler.dispatch)

  def save_reference(self, obj: _Global) -> None:
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))
    self.memoize(obj)

  dispatch[_Global] = save_reference


class _TensorPlaceholder:
  """Pickles exactly like a contiguous CPU tensor would under torch.save."""

  def __init__(self, shape: Sequence[int], dtype):
    self.shape = tuple(int(s) for s in shape)
    self.storage = _Storage(numpy_dtype(dtype), int(np.prod(self.shape)))

  def __reduce_ex__(self, protocol):
    stride, acc = [], 1
    for s in reversed(self.shape):
      stride.append(acc)
      acc *= s
    return (
      _REBUILD_TENSOR,
      (self.storage, 0, self.shape, tuple(reversed(stride)), False, collections.OrderedDict()),
    )


# What torch's zip writer (`torch._C.PyTorchFileWriter`) records besides the pickle and storages.
_ALIGNMENT = 64  # torch.serialization._get_storage_alignment(): storages start at multiples
_FORMAT_VERSION = b"1"
_FILE_FORMAT_VERSION = b"3\n"


class _ZipWriter:
  """A minimal zip writer for what torch.save writes: uncompressed records, each one's data
  aligned by padding its local header's extra field (an "FB" field, as torch does), and ZIP64
  structures where sizes or offsets need them.

  Python's zipfile computes a record's CRC and then writes it, on one thread; here the CRC of a
  big record is computed on a second thread while the data (and the next record) is written, and
  filled into the local header once known (at 2.7B the CRCs take ~1.5 CPU-s, writing ~3).
  """

  _LOCAL = struct.Struct("<IHHHHHIIIHH")
  _CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
  _ZIP64_END = struct.Struct("<IQHHIIQQQQ")
  _ZIP64_LOCATOR = struct.Struct("<IIQI")
  _END = struct.Struct("<IHHHHIIH")
  _MAX = 0xFFFFFFFF
  _DATE = (1 << 5) | 1  # 1980-01-01, as torch dates its records
  _CRC_BACKLOG = 2  # records whose CRC may still be pending (their data is held until known)

  def __init__(self, path: os.PathLike):
    self._file = open(path, "wb", buffering=0)  # every write goes straight to the file
    self._offset = 0
    self._entries: list = []  # [name, crc, size, local header offset]
    self._crcs = None  # the CRC thread, started with the first big record
    self._pending: collections.deque = collections.deque()  # (entry, future of its CRC)

  def _write(self, data) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:  # a write may be short (Linux caps one at ~2 GB)
      view = view[self._file.write(view) :]

  def add(self, name: str, data) -> None:
    data = memoryview(data).cast("B")
    size, offset = data.nbytes, self._offset
    name_bytes = name.encode("utf-8")
    zip64 = size >= self._MAX
    extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
    pad = -(offset + self._LOCAL.size + len(name_bytes) + len(extra) + 4) % _ALIGNMENT
    extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
    small = size < (1 << 20)
    crc = zlib.crc32(data) if small else self._crc_thread().submit(zlib.crc32, data)
    self._write(
      self._LOCAL.pack(
        0x04034B50,
        45 if zip64 else 20,
        0,
        0,
        0,
        self._DATE,
        crc if small else 0,
        min(size, self._MAX),
        min(size, self._MAX),
        len(name_bytes),
        len(extra),
      )
    )
    self._write(name_bytes + extra)
    if (self._offset + self._LOCAL.size + len(name_bytes) + len(extra)) % _ALIGNMENT:
      raise AssertionError(f"record {name} is not {_ALIGNMENT}-byte aligned")
    self._write(data)
    self._offset += self._LOCAL.size + len(name_bytes) + len(extra) + size
    self._entries.append([name_bytes, crc if small else 0, size, offset])
    if not small:
      self._pending.append((self._entries[-1], crc))
    self._settle(len(self._pending) > self._CRC_BACKLOG)

  def _settle(self, wait: bool) -> None:
    """Fills in the CRCs computed so far (waiting for the oldest one if `wait`)."""
    while self._pending and (wait or self._pending[0][1].done()):
      entry, crc = self._pending.popleft()
      entry[1] = crc.result()
      os.pwrite(self._file.fileno(), struct.pack("<I", entry[1]), entry[3] + 14)
      wait = wait and len(self._pending) > self._CRC_BACKLOG

  def _crc_thread(self) -> concurrent.futures.ThreadPoolExecutor:
    if self._crcs is None:
      self._crcs = concurrent.futures.ThreadPoolExecutor(1, "geex-crc")
    return self._crcs

  def close(self) -> None:
    while self._pending:
      self._settle(wait=True)
    start = self._offset
    for name, crc, size, offset in self._entries:
      big = [v for v in (size, size, offset) if v >= self._MAX]
      extra = struct.pack(f"<HH{len(big)}Q", 1, 8 * len(big), *big) if big else b""
      self._write(
        self._CENTRAL.pack(
          0x02014B50,
          45 if big else 20,
          45 if big else 20,
          0,
          0,
          0,
          self._DATE,
          crc,
          min(size, self._MAX),
          min(size, self._MAX),
          len(name),
          len(extra),
          0,
          0,
          0,
          0,
          min(offset, self._MAX),
        )
        + name
        + extra
      )
      self._offset += self._CENTRAL.size + len(name) + len(extra)
    count, length = len(self._entries), self._offset - start
    if count >= 0xFFFF or length >= self._MAX or start >= self._MAX:
      self._write(self._ZIP64_END.pack(0x06064B50, 44, 45, 45, 0, 0, count, count, length, start))
      self._write(self._ZIP64_LOCATOR.pack(0x07064B50, 0, self._offset, 1))
    self._write(
      self._END.pack(
        0x06054B50,
        0,
        0,
        min(count, 0xFFFF),
        min(count, 0xFFFF),
        min(length, self._MAX),
        min(start, self._MAX),
        0,
      )
    )
    self.abandon()

  def abandon(self) -> None:
    """Closes the file (without finishing it) and stops the CRC thread."""
    self._file.close()
    if self._crcs is not None:
      self._crcs.shutdown()


class TorchZipWriter:
  """Writes `obj` (nested dicts whose leaves are (shape, dtype) placeholders) in torch.save's zip
  format, then accepts each tensor's data in pickling order via `write(array)`.

  The records are those torch.save writes (data.pkl, .format_version, .storage_alignment,
  byteorder, data/0.., version, .data/serialization_id), uncompressed, with every storage
  aligned to 64 bytes, so `torch.load` (mmap or not) reads the result.
  """

  def __init__(self, path: os.PathLike, obj):
    self.order: list[_TensorPlaceholder] = []
    counter = iter(range(1 << 62))

    def persistent_id(o):
      if isinstance(o, _Storage):
        o.key = str(next(counter))
        return ("storage", _STORAGE_CLASSES[o.dtype], o.key, "cpu", o.numel)
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
    pickler = _Pickler(buf, protocol=2)  # torch.serialization.DEFAULT_PROTOCOL
    pickler.persistent_id = persistent_id
    pickler.dump(obj)
    # Storage keys follow pickling order (dict insertion order, depth first), which is the order
    # `collect` walked and so the order write() expects data in.
    if [p.storage.key for p in self.order] != [str(i) for i in range(len(self.order))]:
      raise AssertionError("storage keys do not follow the collected order")
    # torch names the archive's top folder after the file, less its extension.
    self._prefix = os.path.splitext(os.path.basename(os.fspath(path)))[0] + "/"
    self._zip = _ZipWriter(path)
    self._zip.add(self._prefix + "data.pkl", buf.getvalue())
    self._zip.add(self._prefix + ".format_version", _FORMAT_VERSION)
    self._zip.add(self._prefix + ".storage_alignment", str(_ALIGNMENT).encode())
    self._zip.add(self._prefix + "byteorder", sys.byteorder.encode())
    self._next = 0

  def write(self, array: np.ndarray) -> None:
    placeholder = self.order[self._next]
    want = (placeholder.shape, placeholder.storage.dtype)
    if (array.shape, array.dtype) != want:
      raise CheckpointError(
        f"tensor {self._next}: got {array.dtype}{list(array.shape)}, "
        f"expected {want[1]}{list(want[0])}"
      )
    # A uint8 view shares the buffer: the record is written straight from it, no copy.
    self._zip.add(
      f"{self._prefix}data/{placeholder.storage.key}",
      np.ascontiguousarray(array).reshape(-1).view(np.uint8),
    )
    self._next += 1

  def close(self) -> None:
    if self._next != len(self.order):
      self._zip.abandon()
      raise CheckpointError(f"wrote {self._next} of {len(self.order)} tensors")
    self._zip.add(self._prefix + "version", _FILE_FORMAT_VERSION)
    self._zip.add(
      self._prefix + ".data/serialization_id", str(uuid.uuid4().int).zfill(40)[:40].encode()
    )
    self._zip.close()

  def abandon(self) -> None:
    """Stops writing after an error (the caller removes the file)."""
    self._zip.abandon()


def placeholder(shape: Sequence[int], dtype) -> _TensorPlaceholder:
  """A tensor of `shape` and `dtype` (numpy or torch) to be written later."""
  return _TensorPlaceholder(shape, dtype)
