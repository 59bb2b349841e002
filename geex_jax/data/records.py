"""TFRecord files: writing (through TensorFlow, for the CRCs), random-access reading (plain Python).

The corpus stores one document per record (a tf.train.Example, tfds_corpus.py), so seqio and TFDS
read the shards with tf.data and the batch pipeline reads document k of a language with one seek,
which is what makes its iterator state O(1) to restore. Reading works on
local files and gs:// objects alike (geex_jax.fileio); writing is local (the corpus builder).
"""

from __future__ import annotations

import os
import struct
from typing import Iterable, Sequence

import numpy as np

from geex_jax import fileio
from geex_jax.errors import InputError

# A record: uint64 length, uint32 masked CRC of the length, payload, uint32 masked CRC of the
# payload.
_HEADER = 12
_FOOTER = 4


def write_records(path: str, payloads: Iterable[bytes]) -> int:
  """Writes `payloads` to a TFRecord file atomically (temp file + rename); returns the count."""
  from geex_jax.data.tf_import import import_tf

  tf = import_tf()  # lazy: only the builder writes; tf.io computes the CRC32C checksums

  n = 0
  with fileio.atomic_path(path) as tmp, tf.io.TFRecordWriter(tmp) as w:
    for p in payloads:
      w.write(p)
      n += 1
  return n


def scan_offsets(path: str) -> tuple[np.ndarray, np.ndarray]:
  """(payload offsets, payload lengths) of every record in a TFRecord file, from its headers."""
  offsets, lengths = [], []
  size = fileio.as_path(path).stat().length if fileio.is_url(path) else os.path.getsize(path)
  with fileio.open_binary(path) as f:
    pos = 0
    while pos < size:
      f.seek(pos)
      header = f.read(_HEADER)
      if len(header) < _HEADER:
        raise InputError(f"truncated record header at byte {pos} of {path}")
      (length,) = struct.unpack("<Q", header[:8])
      offsets.append(pos + _HEADER)
      lengths.append(length)
      pos += _HEADER + length + _FOOTER
    if pos != size:
      raise InputError(f"truncated last record in {path}")
  return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


class RecordReader:
  """Random access to the records of several TFRecord files, numbered in file order."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)
    file_ids, offsets, lengths = [], [], []
    for i, p in enumerate(self.paths):
      try:
        o, l = scan_offsets(p)
      except OSError as e:
        raise InputError(f"cannot read corpus shard {p}: {e.strerror or e}") from None
      file_ids.append(np.full(len(o), i, np.int32))
      offsets.append(o)
      lengths.append(l)
    self._file = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32)
    self._offset = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
    self._length = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    self._handles: dict[int, object] = {}

  def __len__(self) -> int:
    return len(self._offset)

  def __getitem__(self, k: int) -> bytes:
    i = int(self._file[k])
    f = self._handles.get(i)
    if f is None:
      f = self._handles[i] = fileio.open_binary(self.paths[i])
    f.seek(int(self._offset[k]))
    return f.read(int(self._length[k]))

  def close(self) -> None:
    for f in self._handles.values():
      f.close()
    self._handles.clear()
