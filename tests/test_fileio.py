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
