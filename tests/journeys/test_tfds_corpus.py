"""Journey: `geex-data build` as the README shows it, once in-process and once as a Beam pipeline
on the DirectRunner with two worker processes; TFDS opens both; same documents, duplicates across
the two sources (so across workers) dropped once."""

import json

import tensorflow_datasets as tfds

from data_fixtures import code_file, write_tree
from journey_tools import run_ok


def test_single_machine_and_beam_builds_are_the_same_tfds_dataset(tmp_path):
  files = {f"repo_a/f{i}.py": code_file("py", i) for i in range(10)}
  files.update({f"repo_a/lib/g{i}.c": code_file("c", i) for i in range(6)})
  files.update({f"repo_b/copy{i}.py": code_file("py", i) for i in range(3)})  # 3 duplicates
  files.update({"repo_b/small.py": "pass\n", "repo_b/README.txt": "not code"})
  write_tree(tmp_path, files)
  src = ["--src", "repo_a", "--src", "repo_b", "--heldout-fraction", "0.2", "--no-progress"]
  run_ok("geex-data", "build", *src, "--out", "corpus", cwd=tmp_path)
  out = run_ok(
    "geex-data",
    "build",
    *src,
    "--out",
    "corpus_beam",
    "--runner",
    "DirectRunner",
    "--num-workers",
    "2",
    cwd=tmp_path,
  ).stdout
  assert "kept 16 of 20 source files" in out and "duplicate 3" in out
  splits = {}
  for name in ("corpus", "corpus_beam"):
    manifest = json.loads((tmp_path / name / "manifest.json").read_text())
    builder = tfds.builder_from_directory(str(tmp_path / name))
    assert (
      builder.info.splits["python"].num_examples == manifest["languages"]["Python"]["documents"]
    )
    assert builder.info.splits["c"].num_examples == manifest["languages"]["C"]["documents"]
    splits[name] = {
      split: sorted(x["text"] for x in tfds.as_numpy(builder.as_dataset(split=split)))
      for split in builder.info.splits
    }
  assert splits["corpus"] == splits["corpus_beam"]
  assert sum(map(len, splits["corpus"].values())) == 16
  assert sorted(splits["corpus"]["python"] + splits["corpus"].get("python_validation", [])) == (
    sorted(code_file("py", i).encode() for i in range(10))
  )
