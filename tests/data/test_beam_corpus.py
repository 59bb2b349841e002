"""geex_jax/data/beam_corpus.py: the Beam builder's visiting order, and its documents and counts
against the single-machine builder (in-process, DirectRunner with one worker; the two-worker run
through the CLI is tests/journeys/test_tfds_corpus.py)."""

import pytest

from data_fixtures import code_file, write_tree
from geex_jax.data import beam_corpus, corpus, tfds_corpus
from geex_jax.errors import InputError


def test_walk_key_sorts_like_the_single_machine_walk(tmp_path):
  names = ["b.py", "a/z.py", "a/b/c.py", "a/a.py", "ab.py", "a.py", "a/b/a/x.py", "c/d.py"]
  write_tree(tmp_path / "s", {n: "x" for n in names})
  walk = list(corpus.walk_sources([str(tmp_path / "s")]))
  keyed = sorted(walk[::-1], key=lambda p: beam_corpus.walk_key(0, str(tmp_path / "s"), p))
  assert keyed == walk


def documents(manifest, out, split):
  prefix = "" if split == "train" else "validation_"
  return {
    name: sorted(tfds_corpus.DocumentReader([str(out / s) for s in c[f"{prefix}shards"]]))
    for name, c in manifest["languages"].items()
  }


def without_shards(manifest):
  strip = ("shards", "shard_documents", "validation_shards", "validation_shard_documents")
  return {
    **manifest,
    "languages": {
      n: {k: v for k, v in c.items() if k not in strip} for n, c in manifest["languages"].items()
    },
  }


def test_same_documents_and_counts_as_the_single_machine_build(tmp_path):
  files = {f"a/f{i}.py": code_file("py", i) for i in range(8)}
  files.update({f"a/sub/g{i}.c": code_file("c", i) for i in range(5)})
  # Duplicates of a/f3.py and a/f5.py in the second source, and filtered files.
  files.update({"b/f3_copy.py": code_file("py", 3), "b/z/f5.py": code_file("py", 5)})
  files.update({"b/tiny.py": "x = 1\n", "b/notes.txt": "text"})
  write_tree(tmp_path / "src", files)
  sources = [str(tmp_path / "src" / "a"), str(tmp_path / "src" / "b")]
  one = corpus.build_corpus(sources, str(tmp_path / "one"), heldout_fraction=0.3, progress=False)
  beam = beam_corpus.build_corpus_beam(
    sources, str(tmp_path / "beam"), heldout_fraction=0.3, shard_bytes=4000, num_workers=1
  )
  assert without_shards(beam) == without_shards(one)
  assert beam["dropped"]["duplicate"] == 2 and beam["validation_documents"] > 0
  assert len(beam["languages"]["Python"]["shards"]) > 1  # split bytes / shard_bytes buckets
  for split in ("train", "validation"):
    assert documents(beam, tmp_path / "beam", split) == documents(one, tmp_path / "one", split)
  # Rerunning a completed build is a no-op; other options are refused.
  assert (
    beam_corpus.build_corpus_beam(
      sources, str(tmp_path / "beam"), heldout_fraction=0.3, num_workers=1
    )
    == beam
  )
  with pytest.raises(InputError, match="other options"):
    beam_corpus.build_corpus_beam(sources, str(tmp_path / "beam"), num_workers=1)
