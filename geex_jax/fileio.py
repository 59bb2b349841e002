"""Small file helpers every CLI shares: local paths and gs:// URLs, whole-or-nothing writes, fsync
by path, JSONL(.gz).

Where a path's kind is decided: `as_path`. A URL (`gs://bucket/dir`; epath's other schemes work
the same way) stays that URL, as an `epath.Path` on the remote backend; anything else is a local
path, made absolute. Nothing here turns one kind into the other (`pathlib.Path("gs://b/x")`
would be the local folder `./gs:/b/x`; `epath.Path("gs://b/x").absolute()` too).

Remote I/O goes through etils.epath (gcsfs; TensorFlow's gfile where TensorFlow is installed and
`EPATH_USE_TF` is not 0), gcsfs itself for listings and server-side moves, and Orbax/TensorStore,
which speak GCS themselves. With `STORAGE_EMULATOR_HOST` set (a GCS emulator,
e.g. in tests) the gs:// filesystem is set up for it: anonymous, plain HTTP (see
`_use_emulator`). TensorStore is pointed at the same emulator by `TENSORSTORE_GCS_HTTP_URL` and
`GOOGLE_AUTH_TOKEN_FOR_TESTING`.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pathlib
import posixpath
import re
import shutil
import tempfile
import threading
import uuid
import zlib
from typing import IO, Any, Callable, Iterator, Optional, Union

from geex_jax.errors import InputError

PathLike = Union[str, os.PathLike]

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SCHEMES = ("gs", "s3", "az", "hf")  # what epath serves (gs:// is the tested one)
_COPY_CHUNK = 16 << 20


def is_url(path: PathLike) -> bool:
  """Whether `path` names remote storage (gs://...) rather than a local file."""
  return bool(_URL.match(os.fspath(path)))


def as_path(path: PathLike):
  """THE decision between local and remote: an `epath.Path` for a gs:// URL (unchanged) or for
  the absolute local path. Raises InputError for a URL scheme epath cannot serve (http://,
  file://, ...), which would otherwise become a local folder."""
  from etils import epath

  text = os.fspath(path)
  match = _URL.match(text)
  if match is None:
    return epath.Path(os.path.abspath(text))
  if match.group(1).lower() not in _SCHEMES:
    raise InputError(
      f"{text}: unsupported URL scheme {match.group(1)}:// (use a local path or gs://bucket/...)"
    )
  _use_emulator()
  return epath.Path(text)


def resolve(path: PathLike) -> str:
  """`as_path` as a string: the absolute local path, or the URL as given."""
  return os.fspath(as_path(path))


_emulator_lock = threading.Lock()
_emulator_done = False


def _use_emulator() -> None:
  """With STORAGE_EMULATOR_HOST set (gcsfs then talks to that endpoint), make the gs://
  filesystem one that works against an emulator: no credentials (gcsfs would otherwise look for
  Google credentials, i.e. probe the GCE metadata server) and the plain HTTP filesystem (gcsfs's
  default extended one asks a gRPC control plane, which an emulator does not serve, for each
  bucket's layout, retrying for minutes). Explicit fsspec settings (FSSPEC_GS_TOKEN, ...) win."""
  global _emulator_done
  if _emulator_done or not os.environ.get("STORAGE_EMULATOR_HOST"):
    return
  with _emulator_lock:
    if _emulator_done:
      return
    try:
      import fsspec
      import fsspec.config
      from gcsfs.core import GCSFileSystem
    except ImportError:  # no gcsfs: epath falls back to TensorFlow, which ignores emulators
      _emulator_done = True
      return
    for protocol in ("gs", "gcs"):
      fsspec.config.conf.setdefault(protocol, {}).setdefault("token", "anon")
      fsspec.register_implementation(protocol, GCSFileSystem, clobber=True)
    try:  # a filesystem epath built before this point is built again, set up as above
      from etils.epath import backend

      backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
    except (ImportError, AttributeError):
      pass
    _emulator_done = True


def fsync_path(path: PathLike) -> None:
  """Flushes a file (or a directory entry list) that is already written to disk."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, fsync: bool = False, suffix: str = "") -> Iterator[str]:
  """Yields a local temp path to write `path` through (for writers that need a path, e.g.
  tf.io.TFRecordWriter, g++ -o); puts what is there in place as `path` on success, removes it on
  an exception. A block that leaves no file at the temp path leaves `path` as it was.

  Local `path`: a hidden temp file in the same directory (not created yet), then os.replace;
  missing parent directories are created. gs:// `path`: a file in a local temporary directory,
  uploaded whole at the end (a gs:// object is written in one upload, whole or nothing by itself).
  fsync: flush the file to disk before the rename (state that must survive a crash). suffix:
  appended to the temp name, for a writer that goes by the file name (e.g. ".png").
  """
  if is_url(path):
    with tempfile.TemporaryDirectory(prefix="geex-upload-") as d:
      tmp = os.path.join(d, (posixpath.basename(os.fspath(path).rstrip("/")) or "file") + suffix)
      yield tmp
      if os.path.exists(tmp):
        copy_file(tmp, path)
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = os.path.join(path.parent, f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
  try:
    yield tmp
    if os.path.exists(tmp):
      if fsync:
        fsync_path(tmp)
      os.replace(tmp, path)
  except BaseException:
    if os.path.lexists(tmp):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def atomic_write(
  path: PathLike, mode: str = "w", *, fsync: bool = False, encoding: str = "utf-8"
) -> Iterator[IO]:
  """Writes a whole file or nothing: yields a file object ("w": text in `encoding`, "wb":
  binary) on a temp file (see `atomic_path`), which replaces `path` when the block ends without
  an exception; on an exception the temp file is removed, `path` is untouched, and the exception
  propagates. gs:// paths: written locally, uploaded whole at the end.

  fsync: flush to disk before the rename (state files that must survive a crash).
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_write: mode must be 'w' or 'wb', not {mode!r}")
  with atomic_path(path) as tmp:
    # "x": the temp name is ours alone; created with the umask's permissions, like open(path, "w").
    with open(tmp, mode.replace("w", "x"), encoding=None if mode == "wb" else encoding) as f:
      yield f
      if fsync:
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: PathLike, text: str, *, fsync: bool = False) -> None:
  """Writes a whole file or nothing (`atomic_write` of one UTF-8 text)."""
  with atomic_write(path, fsync=fsync) as f:
    f.write(text)


def open_binary(path: PathLike) -> io.BufferedIOBase:
  """A seekable binary reader of a local file or a gs:// object."""
  if is_url(path):
    return as_path(path).open("rb")
  return open(path, "rb")


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies one file between any two places (local <-> gs://), streaming through epath."""
  src_path, dst_path = as_path(src), as_path(dst)
  if not is_url(dst):
    dst_path.parent.mkdir(parents=True, exist_ok=True)
  with src_path.open("rb") as fin, dst_path.open("wb") as fout:
    shutil.copyfileobj(fin, fout, _COPY_CHUNK)


def _remote_fs(url: PathLike):
  """(fsspec filesystem, bucket/key path without the scheme) of a URL, listings uncached."""
  import fsspec

  _use_emulator()
  fs, root = fsspec.core.url_to_fs(os.fspath(url))
  fs.invalidate_cache()
  return fs, root.rstrip("/")


def list_files(root: PathLike) -> list[str]:
  """Paths of every file under directory `root` (local or gs://), relative to it,
  '/'-separated, sorted."""
  if is_url(root):
    fs, base = _remote_fs(root)
    return sorted(posixpath.relpath(p, base) for p in fs.find(base) if not p.endswith("/"))
  out = []
  for directory, _, files in os.walk(root):
    rel = os.path.relpath(directory, root)
    out += [name if rel == "." else f"{rel}/{name}".replace(os.sep, "/") for name in files]
  return sorted(out)


def _ordered(files: list[str], last: tuple[str, ...]) -> list[str]:
  return [f for f in files if f not in last] + [f for f in files if f in last]


def copy_tree(src: PathLike, dst: PathLike, *, last: tuple[str, ...] = ()) -> None:
  """Copies every file under directory `src` to the same relative paths under `dst` (local <->
  gs://). Files named in `last` (relative paths, e.g. config.json) are copied after all others,
  so a reader that looks for them first never sees an incomplete tree."""
  src_root, dst_root = os.fspath(as_path(src)), os.fspath(as_path(dst))
  for rel in _ordered(list_files(src), last):
    copy_file(f"{src_root}/{rel}", f"{dst_root}/{rel}")


def move_remote_tree(src: str, dst: str, *, last: tuple[str, ...] = ()) -> None:
  """Moves the object `src`, or every object under gs:// prefix `src`, to `dst` (server-side
  copies, then deletes `src`); files in `last` are copied last. GCS has no atomic rename: if a
  copy fails, what was copied to `dst` is deleted again before the error propagates."""
  fs, base = _remote_fs(src)
  _, target = _remote_fs(dst)
  if fs.isfile(base):  # one object: its copy appears whole or not at all
    fs.copy(base, target)
    fs.rm_file(base)
    return
  done = []
  try:
    for rel in _ordered(list_files(src), last):
      fs.copy(f"{base}/{rel}", f"{target}/{rel}")
      done.append(rel)
  except BaseException:
    for rel in done:
      try:
        fs.rm_file(f"{target}/{rel}")
      except OSError:
        pass
    raise
  fs.rm(base, recursive=True)


def remove(path: PathLike) -> None:
  """Deletes a file or a whole tree, local or remote; absent is fine."""
  if is_url(path):
    fs, key = _remote_fs(path)
    try:
      if fs.isdir(key):
        fs.rm(key, recursive=True)
      elif fs.exists(key):
        fs.rm_file(key)
    except FileNotFoundError:
      pass
    return
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.unlink(path)


def iter_jsonl(
  path: PathLike,
  *,
  skip_invalid: bool = False,
  error: Optional[Callable[[int, ValueError], Exception]] = None,
) -> Iterator[tuple[int, Any]]:
  """(line number, parsed value) of every non-blank line of a .jsonl or .jsonl.gz file (local or
  gs://).

  Raises InputError (one actionable line) for an unreadable file or a line that is not JSON.
  skip_invalid: skip a line that is not JSON instead (e.g. torn by a kill). error: builds the
  exception raised for such a line from (line number, the JSON error), for a caller's own message.
  """
  remote = is_url(path)
  path = as_path(path) if remote else pathlib.Path(path)
  try:
    with contextlib.ExitStack() as stack:
      if remote:
        raw = stack.enter_context(path.open("rb"))
        f = (
          gzip.open(raw, "rt", encoding="utf-8")
          if path.suffix == ".gz"
          else io.TextIOWrapper(raw, encoding="utf-8")
        )
      else:
        f = (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8")
      stack.enter_context(f)
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          yield lineno, json.loads(line)
        except ValueError as e:
          if skip_invalid:
            continue
          raise (
            error(lineno, e) if error else InputError(f"{path}:{lineno}: not JSON: {e}")
          ) from None
  except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
    raise InputError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
