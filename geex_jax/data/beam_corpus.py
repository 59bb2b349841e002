"""The corpus builder as an Apache Beam pipeline, for corpora that outgrow one machine.

Same filters (corpus.classify_path / read_document), same exact deduplication, same held-out
split and the same output (a geex-corpus/2 TFDS dataset, tfds_corpus.py) as corpus.build_corpus,
on any Beam runner: DirectRunner here and in the tests, Dataflow / Spark / Flink for real corpora.

  sources --walk (one source per worker)--> (walk key, path)
    --read + filter--> dropped counts | (content digest, (walk key, language, text))
    --GroupByKey(digest)--> the document that comes first in walk order is kept, the others are
                            duplicates: exact across workers, and the same choice the
                            single-machine builder makes (it keeps the first it visits)
    --bucket--> (language, split, shard): a split's bytes / `shard_bytes` shards, by digest
    --GroupByKey--> one shard file per bucket, its documents in walk order
  then, on the launching machine: shards renamed to NNNNN = 0, 1, ... per split, TFDS metadata,
  manifest.json.

Documents and counts equal the single-machine build of the same sources; the shard boundaries
differ (hash buckets here, flushes there). Not supported here: max_bytes_per_language (it depends
on visiting order) and resuming (rerun the pipeline; a completed corpus is a no-op).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
from typing import Optional, Sequence

from geex_jax import fileio
from geex_jax import languages as langs
from geex_jax.data import corpus, tfds_corpus
from geex_jax.data import filters as F
from geex_jax.errors import InputError

_WORK_DIR = ".beam"


def walk_key(source_index: int, source: str, path: str) -> tuple:
  """A sort key equal to corpus.walk_sources' visiting order: per directory, its files (sorted)
  before its subdirectories (sorted)."""
  rel = os.path.relpath(path, source) if path != source else ""
  parts = rel.split(os.sep) if rel else []
  return (source_index, tuple((1, p) for p in parts[:-1]) + tuple((0, p) for p in parts[-1:]))


def _walk(indexed_source):
  i, source = indexed_source
  if fileio.is_url(source):  # a bucket prefix: its objects in name order
    for rel in fileio.list_files(source):
      yield (i, ((0, rel),)), posixpath.join(source, rel)
    return
  for path in corpus.walk_sources([source]):
    yield walk_key(i, source, path), path


class _ReadAndFilter:
  """path -> ("count", (language or None, what), 1) events and ("doc", digest, document)."""

  def __init__(self, languages, cfg):
    self.languages, self.cfg = languages, cfg

  def __call__(self, keyed_path):
    key, path = keyed_path
    lang, skip = corpus.classify_path(path, self.languages)
    if lang is None:
      yield "count", (None, skip)
      return
    yield "count", (lang, "files")
    reason, data, digest = corpus.read_document(path, self.cfg)
    if reason is not None:
      yield "count", (lang, reason)
      return
    yield "doc", (digest, (key, lang, data))


def _first_in_walk_order(group, heldout_fraction):
  """A content digest's files -> the kept document ((language, split), (key, digest, text)) and
  a "duplicate" count per other file."""
  digest, docs = group
  docs = sorted(docs, key=lambda d: d[0])
  key, lang, data = docs[0]
  for _, dup_lang, _ in docs[1:]:
    yield "count", (dup_lang, "duplicate")
  split = "validation" if corpus.is_heldout(digest, heldout_fraction) else "train"
  yield "kept", ((lang, split), (key, digest, data))


def _bucket(kept, split_bytes, shard_bytes):
  (lang, split), (key, digest, data) = kept
  n = max(1, math.ceil(split_bytes[(lang, split)] / shard_bytes))
  return (lang, split, int.from_bytes(digest[8:16], "big") % n), (key, data)


class _WriteShard:
  def __init__(self, work_dir, file_format):
    self.work_dir, self.file_format = work_dir, file_format

  def __call__(self, bucket):
    (lang, split, shard), docs = bucket
    texts = [d for _, d in sorted(docs, key=lambda d: d[0])]
    slug = langs.get(lang).slug
    name = f"{tfds_corpus.split_name(slug, split)}-bucket{shard:05d}"
    path = posixpath.join(self.work_dir, name)
    n = tfds_corpus.write_shard(path, texts, self.file_format)
    yield json.dumps(
      {
        "language": lang,
        "split": split,
        "bucket": shard,
        "path": name,
        "documents": n,
        "bytes": sum(len(t) for t in texts),
      }
    )


def _pipeline_options(runner: str, pipeline_args: Sequence[str], num_workers: int):
  from apache_beam.options.pipeline_options import PipelineOptions

  args = [f"--runner={runner}", *pipeline_args]
  if runner == "DirectRunner":
    args += [f"--direct_num_workers={num_workers}"]
    if num_workers > 1 and not any(a.startswith("--direct_running_mode") for a in pipeline_args):
      args += ["--direct_running_mode=multi_processing"]
  return PipelineOptions(args)


def build_corpus_beam(
  sources: Sequence[str],
  out: str,
  *,
  languages: Optional[Sequence[str]] = None,
  filter_config: F.FilterConfig = F.FilterConfig(),
  shard_bytes: int = 256 << 20,
  heldout_fraction: float = corpus.DEFAULT_HELDOUT_FRACTION,
  file_format: str = tfds_corpus.DEFAULT_FILE_FORMAT,
  runner: str = "DirectRunner",
  num_workers: int = 2,
  pipeline_args: Sequence[str] = (),
) -> dict:
  """Builds the corpus in `out` with Beam; returns its manifest (see the module docstring).

  runner: a Beam runner name; pipeline_args: further Beam options (--project, --region,
  --temp_location, ... for Dataflow); num_workers: the DirectRunner's processes.
  """
  import apache_beam as beam

  if not sources:
    raise InputError("no --src directory given")
  heldout_fraction = corpus._check_fraction(heldout_fraction)
  tfds_corpus.check_file_format(file_format)
  for s in sources:
    if not fileio.is_url(s) and not os.path.exists(s):
      raise InputError(f"source {s!r} does not exist")
  out = fileio.resolve(out)
  lang_names = corpus._resolve_languages(languages)
  options = {
    "sources": [fileio.resolve(s) for s in sources],
    "languages": lang_names,
    "filters": dataclasses.asdict(filter_config),
    "max_bytes_per_language": None,
    "heldout_fraction": heldout_fraction,
    "file_format": file_format,
    "format": corpus.FORMAT,
  }
  manifest_path = posixpath.join(out, corpus.MANIFEST)
  if fileio.as_path(manifest_path).exists():
    manifest = corpus.load_manifest(out)
    if manifest.get("options") != options:
      raise InputError(
        f"{out} already holds a corpus built with other options "
        f"({corpus._option_changes(manifest.get('options'), options)}); "
        "use another --out or delete it"
      )
    return manifest
  work = posixpath.join(out, _WORK_DIR)
  if fileio.as_path(work).exists():
    fileio.remove(work)  # a previous run's partial output: the pipeline redoes all of it

  with beam.Pipeline(options=_pipeline_options(runner, pipeline_args, num_workers)) as p:
    events = (
      p
      | "Sources" >> beam.Create(list(enumerate(options["sources"])))
      | "Walk" >> beam.FlatMap(_walk)
      | "Spread" >> beam.Reshuffle()
      | "ReadAndFilter" >> beam.FlatMap(_ReadAndFilter(lang_names, filter_config))
    )
    docs = events | "Docs" >> beam.Filter(lambda e: e[0] == "doc") | beam.Map(lambda e: e[1])
    chosen = (
      docs
      | "ByDigest" >> beam.GroupByKey()
      | "Dedup" >> beam.FlatMap(_first_in_walk_order, heldout_fraction)
    )
    kept = chosen | "Kept" >> beam.Filter(lambda e: e[0] == "kept") | beam.Map(lambda e: e[1])
    split_bytes = (
      kept | beam.Map(lambda k: (k[0], len(k[1][2]))) | "SplitBytes" >> beam.CombinePerKey(sum)
    )
    shards = (
      kept
      | "Bucket" >> beam.Map(_bucket, beam.pvalue.AsDict(split_bytes), shard_bytes)
      | "ByShard" >> beam.GroupByKey()
      | "WriteShards" >> beam.FlatMap(_WriteShard(work, file_format))
    )
    counts = (
      (events, chosen)
      | beam.Flatten()
      | "Counts" >> beam.Filter(lambda e: e[0] == "count")
      | beam.Map(lambda e: (json.dumps(e[1]), 1))
      | "SumCounts" >> beam.CombinePerKey(sum)
      | beam.MapTuple(lambda k, n: json.dumps([json.loads(k), n]))
    )
    # Two small lists (a row per shard, a row per (language, outcome)), written by one worker
    # through geex_jax.fileio: local or gs://, without Beam's own filesystems.
    for label, rows in (("shards", shards), ("counts", counts)):
      (
        rows
        | f"All{label}" >> beam.combiners.ToList()
        | f"Write{label}" >> beam.Map(_write_rows, posixpath.join(work, f"{label}.jsonl"))
      )

  return _finish(out, work, options)


def _write_rows(rows: list, path: str) -> None:
  fileio.write_atomic(path, "".join(r + "\n" for r in sorted(rows)))


def _read_lines(work: str, name: str) -> list:
  text = fileio.as_path(posixpath.join(work, f"{name}.jsonl")).read_text(encoding="utf-8")
  return [json.loads(line) for line in text.splitlines() if line]


def _finish(out: str, work: str, options: dict) -> dict:
  """Renames the bucket files to the TFDS shard names and writes the manifest's counts."""
  names = options["languages"] or [l.name for l in langs.LANGUAGES]
  counts = corpus._empty_counts(names)
  for (lang, what), n in _read_lines(work, "counts"):
    if lang is None:
      counts[what] += n
    elif what == "files":
      counts["files"] += n
      counts["languages"][lang]["files"] += n
    else:
      counts["dropped"][what] += n
      counts["languages"][lang]["dropped"][what] += n
  shards = sorted(
    _read_lines(work, "shards"), key=lambda r: (r["language"], r["split"], r["bucket"])
  )
  for r in shards:
    lc = counts["languages"][r["language"]]
    prefix = "" if r["split"] == "train" else "validation_"
    rel = tfds_corpus.shard_path(
      lc["slug"], r["split"], len(lc[f"{prefix}shards"]), options["file_format"]
    )
    fileio.as_path(posixpath.join(work, r["path"])).rename(posixpath.join(out, rel))
    lc[f"{prefix}shards"].append(rel)
    lc[f"{prefix}shard_documents"].append(r["documents"])
    corpus.count_kept(counts, r["language"], r["split"], r["bytes"], r["documents"])
  fileio.remove(work)
  return corpus.finish_corpus(out, options, counts)
