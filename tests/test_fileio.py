"""geex_jax/fileio.py: whole-or-nothing writes, JSONL(.gz) reading with located errors."""

import gzip

import pytest

from geex_jax import fileio
from geex_jax.errors import InputError


def test_write_atomic_replaces_whole_file_and_leaves_no_temp(tmp_path):
  path = tmp_path / "sub" / "out.json"
  fileio.write_atomic(path, "first")
  fileio.write_atomic(path, "second", fsync=True)
  assert path.read_text() == "second"
  assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_write_atomic_failure_keeps_old_content(tmp_path):
  path = tmp_path / "out.txt"
  fileio.write_atomic(path, "old")
  with pytest.raises(TypeError):
    fileio.write_atomic(path, None)  # not text: fails while writing the temp file
  assert path.read_text() == "old"
  assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_success_replaces_and_leaves_no_temp(tmp_path):
  path = tmp_path / "out.txt"
  path.write_text("old")
  with fileio.atomic_write(path) as f:
    f.write("new ü")
    assert path.read_text() == "old"  # nothing visible until the block ends
  assert path.read_text(encoding="utf-8") == "new ü"
  assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_failure_keeps_old_file_and_removes_temp(tmp_path):
  path = tmp_path / "out.txt"
  path.write_text("old")
  with pytest.raises(RuntimeError, match="boom"):
    with fileio.atomic_write(path) as f:
      f.write("half")
      raise RuntimeError("boom")
  assert path.read_text() == "old"
  assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_failure_on_new_path_leaves_nothing(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    with fileio.atomic_write(tmp_path / "new.bin", "wb"):
      raise KeyboardInterrupt
  assert list(tmp_path.iterdir()) == []


def test_atomic_write_binary_and_fsync_creates_parents(tmp_path):
  path = tmp_path / "a" / "b" / "blob.bin"
  with fileio.atomic_write(path, "wb", fsync=True) as f:
    f.write(b"\x00\xffdata")
  assert path.read_bytes() == b"\x00\xffdata"
  assert [p.name for p in path.parent.iterdir()] == ["blob.bin"]


def test_atomic_write_rejects_other_modes(tmp_path):
  with pytest.raises(ValueError):
    with fileio.atomic_write(tmp_path / "x", "a"):
      pass


def test_atomic_path_moves_what_the_block_wrote_and_nothing_else(tmp_path):
  path = tmp_path / "plot.png"
  with fileio.atomic_path(path, suffix=".png") as tmp:
    assert tmp.endswith(".png") and tmp != str(path)
    with open(tmp, "wb") as f:
      f.write(b"png")
  assert path.read_bytes() == b"png"
  with fileio.atomic_path(path):
    pass  # wrote nothing: the old file stays
  assert path.read_bytes() == b"png"
  with pytest.raises(OSError):
    with fileio.atomic_path(path) as tmp:
      open(tmp, "wb").close()
      raise OSError("writer failed")
  assert path.read_bytes() == b"png"
  assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_iter_jsonl_skip_invalid_and_custom_error(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"step": 1}\n{"step": 2\n\n{"step": 3}\n{"ste')
  assert list(fileio.iter_jsonl(path, skip_invalid=True)) == [(1, {"step": 1}), (4, {"step": 3})]
  with pytest.raises(InputError, match=r"m.jsonl:2: bad line"):
    list(fileio.iter_jsonl(path, error=lambda n, e: InputError(f"{path}:{n}: bad line")))


def test_iter_jsonl_plain_and_gzip_skip_blank_lines(tmp_path):
  plain = tmp_path / "a.jsonl"
  plain.write_text('{"x": 1}\n\n[2]\n')
  zipped = tmp_path / "a.jsonl.gz"
  with gzip.open(zipped, "wt") as f:
    f.write('{"x": 1}\n\n[2]\n')
  assert list(fileio.iter_jsonl(plain)) == [(1, {"x": 1}), (3, [2])]
  assert list(fileio.iter_jsonl(zipped)) == [(1, {"x": 1}), (3, [2])]


def test_iter_jsonl_errors_name_file_and_line(tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"x": 1}\n{oops\n')
  with pytest.raises(InputError, match=r"bad.jsonl:2: not JSON"):
    list(fileio.iter_jsonl(bad))
  with pytest.raises(InputError, match="cannot read"):
    list(fileio.iter_jsonl(tmp_path / "missing.jsonl"))
  corrupt = tmp_path / "c.jsonl.gz"
  corrupt.write_bytes(b"\x1f\x8b\x08garbage")
  with pytest.raises(InputError, match="cannot read"):
    list(fileio.iter_jsonl(corrupt))
