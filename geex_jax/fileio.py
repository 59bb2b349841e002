"""Small file helpers every CLI shares: whole-or-nothing writes, fsync by path, JSONL(.gz)."""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import tempfile
import zlib
from typing import Any, Iterator, Union

from geex_jax.errors import InputError

PathLike = Union[str, os.PathLike]


def fsync_path(path: PathLike) -> None:
  """Flushes a file (or a directory entry list) that is already written to disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_atomic(path: PathLike, text: str, *, fsync: bool = False) -> None:
  """Writes a whole file or nothing: a temp file in the same directory, then a rename.

  fsync: flush to disk before the rename (state files that must survive a crash).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def iter_jsonl(path: PathLike) -> Iterator[tuple[int, Any]]:
  """(line number, parsed value) of every non-blank line of a .jsonl or .jsonl.gz file.

  Raises InputError (one actionable line) for an unreadable file or a line that is not JSON.
  """
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  try:
    with opener(path, "rt", encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          yield lineno, json.loads(line)
        except ValueError as e:
          raise InputError(f"{path}:{lineno}: not JSON: {e}") from None
  except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
    raise InputError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
