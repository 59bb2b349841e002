"""Corpus builder: source trees -> a filtered, deduplicated TFDS dataset with a split per language.

Layout of a corpus directory (the TFDS side is described in tfds_corpus.py):
  manifest.json                 counts per language and per filter reason, shard lists, options;
                                written last: a corpus without it is unfinished
  dataset_info.json, features.json   TFDS metadata (`tfds.builder_from_directory` opens the corpus)
  geex_corpus-<slug>.tfrecord-NNNNN  a language's training documents (tf.train.Example
                                {"text"}), NNNNN = 0, 1, ... (one shard per flush holding the
                                language)
  geex_corpus-<slug>_validation.tfrecord-NNNNN  its held-out documents, the same way
  .build/state.json, hashes.bin resume state (kept after completion, so a rerun is a no-op)

Held-out split: a kept document is held out (validation) when its content hash falls below
`heldout_fraction` (`is_heldout`), so membership depends on the text alone: not on file order,
paths, the other sources or the flush size, and a duplicate can never land in both splits.
Per language the manifest records `documents`/`shards` (train) and `validation_documents`/
`validation_shards`; manifests written before the split have no validation fields (no split).

Resumable: files are visited in a deterministic (sorted) order and buffered; every `flush_bytes`
the buffers are written as one new shard per language, then the dedup hashes, then the state, each
atomically. A crash loses at most the unflushed files, which a rerun visits again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import sysconfig
from typing import Iterable, Optional, Sequence

from geex_jax import fileio
from geex_jax import languages as langs
from geex_jax.data import filters as F
from geex_jax.data import tfds_corpus
from geex_jax.errors import InputError

MANIFEST = "manifest.json"
# /1: raw UTF-8 records in <slug>/<slug>-NNNNN.tfrecord; /2: the TFDS dataset of tfds_corpus.py.
FORMAT = "geex-corpus/2"
_STATE_DIR = ".build"
_HASH_BYTES = 16
DEFAULT_HELDOUT_FRACTION = 0.01
_SKIP_DIRS = frozenset(
  {"__pycache__", ".git", ".hg", ".svn", "node_modules", "site-packages", "dist-packages"}
)


def _atomic_write_json(path: str, obj) -> None:
  fileio.write_atomic(path, json.dumps(obj, indent=1, sort_keys=True), fsync=True)


def walk_sources(sources: Sequence[str]) -> Iterable[str]:
  """Every file under `sources`, in a deterministic order (sorted names, sources in given order)."""
  for src in sources:
    if os.path.isfile(src):
      yield src
      continue
    for root, dirs, files in os.walk(src):
      dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
      for name in sorted(files):
        yield os.path.join(root, name)


def is_heldout(digest: bytes, fraction: float) -> bool:
  """Whether the document whose blake2b content digest is `digest` is held out: its first 8 bytes,
  read as a number in [0, 1), fall below `fraction`."""
  return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def content_digest(data: bytes) -> bytes:
  """The content hash behind deduplication and the held-out split."""
  return hashlib.blake2b(data, digest_size=_HASH_BYTES).digest()


def _check_fraction(fraction: float) -> float:
  try:
    fraction = float(fraction)
  except (TypeError, ValueError):
    raise InputError(f"heldout_fraction {fraction!r} is not a number") from None
  if not 0.0 <= fraction < 1.0:
    raise InputError(f"heldout_fraction {fraction} is not in [0, 1)")
  return fraction


def _option_changes(saved: Optional[dict], now: dict) -> str:
  saved = saved or {}
  keys = sorted(k for k in {*saved, *now} if saved.get(k) != now.get(k))
  return ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys)


def _resolve_languages(names: Optional[Sequence[str]]) -> Optional[list[str]]:
  if not names:
    return None
  out = []
  for n in names:
    try:
      out.append(langs.get(n).name)
    except langs.UnknownLanguageError as e:
      raise InputError(str(e)) from None
  return sorted(set(out))


def _empty_counts(lang_names: Iterable[str]) -> dict:
  return {
    "files": 0,
    "kept": 0,
    "bytes": 0,
    "unknown_extension": 0,
    "other_language": 0,
    "validation_documents": 0,
    "dropped": {r: 0 for r in F.REASONS},
    "languages": {
      n: {
        "slug": langs.get(n).slug,
        "tag": langs.get(n).tag,
        "files": 0,
        "documents": 0,
        "bytes": 0,
        "dropped": {r: 0 for r in F.REASONS},
        "shards": [],
        "shard_documents": [],
        "validation_documents": 0,
        "validation_bytes": 0,
        "validation_shards": [],
        "validation_shard_documents": [],
      }
      for n in lang_names
    },
  }


def classify_path(path: str, languages: Optional[Sequence[str]]) -> tuple[Optional[str], str]:
  """(language name, "") of a file the builder reads; (None, "unknown_extension" |
  "other_language") of one it skips by name alone."""
  lang = langs.from_path(path)
  if lang is None:
    return None, "unknown_extension"
  if languages is not None and lang.name not in languages:
    return None, "other_language"
  return lang.name, ""


def read_document(
  path: str, cfg: F.FilterConfig
) -> tuple[Optional[str], Optional[bytes], Optional[bytes]]:
  """(None, text, content digest) of a file the filters keep; (reason, None, None) otherwise.
  Deduplication is the caller's: it depends on what was kept before."""
  try:
    # A gs:// object (the Beam builder's sources) is read up to the size limit without a stat.
    reason = None if fileio.is_url(path) else F.size_reason(os.stat(path).st_size, cfg)
    if reason is None:
      with fileio.open_binary(path) as f:
        data = f.read(cfg.max_bytes + 1)
      reason = F.size_reason(len(data), cfg)  # the file may have changed since stat
  except OSError:
    reason = "unreadable"
  if reason is None:
    reason, _ = F.content_reason(data, cfg)
  if reason is not None:
    return reason, None, None
  return None, data, content_digest(data)


def count_kept(counts: dict, lang: str, split: str, size: int, documents: int = 1) -> None:
  """Adds `documents` kept documents of `size` bytes in all to the manifest counts."""
  lc = counts["languages"][lang]
  counts["kept"] += documents
  counts["bytes"] += size
  if split == "validation":
    counts["validation_documents"] += documents
    lc["validation_documents"] += documents
    lc["validation_bytes"] += size
  else:
    lc["documents"] += documents
    lc["bytes"] += size


def finish_corpus(out: str, options: dict, counts: dict) -> dict:
  """Writes the TFDS metadata, then the manifest (the completion marker); returns the manifest."""
  manifest = {"format": FORMAT, "complete": True, "options": options, **counts}
  # Only languages with (training) documents are part of the corpus (and get a seqio task).
  manifest["languages"] = {n: c for n, c in manifest["languages"].items() if c["documents"]}
  tfds_corpus.write_dataset_info(out, manifest)
  _atomic_write_json(os.path.join(out, MANIFEST), manifest)
  return manifest


def _check_format(manifest: dict, path: str) -> None:
  found = manifest.get("format")
  if found != FORMAT and isinstance(found, str) and found.startswith("geex-corpus/"):
    raise InputError(
      f"{path} describes a corpus in the older {found} layout (raw records, no TFDS metadata); "
      f"rebuild it with `geex-data build --out NEW_DIR` (same --src) to get {FORMAT}"
    )


class _Builder:
  """One build run; `run()` returns the manifest."""

  def __init__(
    self,
    sources,
    out,
    languages,
    cfg,
    flush_bytes,
    max_bytes_per_language,
    heldout_fraction,
    file_format,
    progress,
  ):
    self.sources = [os.path.abspath(s) for s in sources]
    self.out = out
    self.languages = languages
    self.cfg = cfg
    self.flush_bytes = flush_bytes
    self.budget = max_bytes_per_language
    self.heldout_fraction = heldout_fraction
    self.progress = progress
    self.state_dir = os.path.join(out, _STATE_DIR)
    self.options = {
      "sources": self.sources,
      "languages": languages,
      "filters": dataclasses.asdict(cfg),
      "max_bytes_per_language": max_bytes_per_language,
      "heldout_fraction": heldout_fraction,
      "file_format": file_format,
      "format": FORMAT,
    }

  def run(self) -> dict:
    manifest_path = os.path.join(self.out, MANIFEST)
    if os.path.exists(manifest_path):
      with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
      _check_format(manifest, manifest_path)
      if manifest.get("options") != self.options:
        raise InputError(
          f"{self.out} already holds a corpus built with other options "
          f"({_option_changes(manifest.get('options'), self.options)}); "
          "use another --out or delete it"
        )
      return manifest  # a completed build: rerunning is a no-op
    os.makedirs(self.state_dir, exist_ok=True)
    files = [p for p in walk_sources(self.sources)]
    self._load_or_init_state(files)
    buffers: dict[tuple[str, str], list[bytes]] = {}
    buffered = 0
    self._open_hashes()
    try:
      from tqdm import tqdm

      bar = tqdm(
        total=len(files),
        initial=self.state["files_done"],
        unit="file",
        desc="geex-data build",
        disable=not self.progress,
        file=sys.stderr,
      )
      for i in range(self.state["files_done"], len(files)):
        doc = self._visit(files[i])
        if doc is not None:
          lang, split, data = doc
          buffers.setdefault((lang, split), []).append(data)
          buffered += len(data)
        bar.update(1)
        if buffered >= self.flush_bytes:
          self._flush(buffers, files_done=i + 1)
          buffers, buffered = {}, 0
      self._flush(buffers, files_done=len(files))
      bar.close()
    finally:
      self._hashes_file.close()
    return finish_corpus(self.out, self.options, self.state["counts"])

  def _load_or_init_state(self, files: list[str]) -> None:
    path = os.path.join(self.state_dir, "state.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        state = json.load(f)
      if state["options"] != self.options or state["num_files"] != len(files):
        changes = _option_changes(state["options"], self.options)
        raise InputError(
          f"{self.out} holds an unfinished build with other sources or options"
          f"{f' ({changes})' if changes else ''}; use another --out or delete it"
        )
    else:
      names = self.languages or [l.name for l in langs.LANGUAGES]
      state = {
        "options": self.options,
        "num_files": len(files),
        "files_done": 0,
        "flushes": 0,
        "hashes_len": 0,
        "counts": _empty_counts(names),
      }
    self.state = state
    # Shards written after the last saved state belong to files that will be visited again.
    known = {
      s
      for c in state["counts"]["languages"].values()
      for s in (*c["shards"], *c["validation_shards"])
    }
    prefix = tfds_corpus.DATASET_NAME + "-"
    for name in os.listdir(self.out):
      if name.startswith(prefix) and name not in known:
        os.remove(os.path.join(self.out, name))

  def _open_hashes(self) -> None:
    path = os.path.join(self.state_dir, "hashes.bin")
    mode = "r+b" if os.path.exists(path) else "w+b"
    self._hashes_file = open(path, mode)
    self._hashes_file.truncate(self.state["hashes_len"])
    self._hashes_file.seek(0)
    raw = self._hashes_file.read()
    self.seen = {raw[i : i + _HASH_BYTES] for i in range(0, len(raw), _HASH_BYTES)}
    self._new_hashes: list[bytes] = []

  def _drop(self, lang: Optional[dict], reason: str) -> None:
    self.state["counts"]["dropped"][reason] += 1
    if lang is not None:
      lang["dropped"][reason] += 1

  def _visit(self, path: str) -> Optional[tuple[str, str, bytes]]:
    """(language, "train" | "validation", text) of a kept file; None when it is dropped."""
    counts = self.state["counts"]
    lang, reason = classify_path(path, self.languages)
    if lang is None:
      counts[reason] += 1
      return None
    lc = counts["languages"][lang]
    counts["files"] += 1
    lc["files"] += 1
    if self.budget is not None and lc["bytes"] + lc["validation_bytes"] >= self.budget:
      self._drop(lc, "over_budget")
      return None
    reason, data, digest = read_document(path, self.cfg)
    if reason is None:
      if digest in self.seen:
        reason = "duplicate"
      else:
        self.seen.add(digest)
        self._new_hashes.append(digest)
    if reason is not None:
      self._drop(lc, reason)
      return None
    split = "validation" if is_heldout(digest, self.heldout_fraction) else "train"
    count_kept(counts, lang, split, len(data))
    return lang, split, data

  def _flush(self, buffers: dict[tuple[str, str], list[bytes]], files_done: int) -> None:
    counts = self.state["counts"]
    flush = self.state["flushes"]
    fmt = self.options["file_format"]
    for name, split in sorted(buffers):
      lc = counts["languages"][name]
      prefix = "" if split == "train" else "validation_"
      rel = tfds_corpus.shard_path(lc["slug"], split, len(lc[f"{prefix}shards"]), fmt)
      n = tfds_corpus.write_shard(os.path.join(self.out, rel), buffers[name, split], fmt)
      lc[f"{prefix}shard_documents"].append(n)
      lc[f"{prefix}shards"].append(rel)
    self._hashes_file.seek(self.state["hashes_len"])
    self._hashes_file.write(b"".join(self._new_hashes))
    self._hashes_file.flush()
    os.fsync(self._hashes_file.fileno())
    self.state["hashes_len"] += _HASH_BYTES * len(self._new_hashes)
    self._new_hashes = []
    self.state["files_done"] = files_done
    self.state["flushes"] = flush + 1
    _atomic_write_json(os.path.join(self.state_dir, "state.json"), self.state)


def build_corpus(
  sources: Sequence[str],
  out: str,
  *,
  languages: Optional[Sequence[str]] = None,
  filter_config: F.FilterConfig = F.FilterConfig(),
  flush_bytes: int = 256 << 20,
  max_bytes_per_language: Optional[int] = None,
  heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
  file_format: str = tfds_corpus.DEFAULT_FILE_FORMAT,
  progress: bool = True,
) -> dict:
  """Builds (or resumes, or finds complete) the corpus in `out`; returns its manifest.

  Args:
    sources: directories (or single files) to walk.
    out: the corpus directory (created).
    languages: restrict to these languages (names or aliases); None = every registered language.
    filter_config: thresholds of the paper's filters.
    flush_bytes: buffered text written per flush (shard granularity and resume granularity).
    max_bytes_per_language: stop taking files of a language past this many bytes, train and
      held-out together (embedded demo).
    heldout_fraction: the share of documents held out as the validation split, chosen by content
      hash (`is_heldout`); 0 = none.
    file_format: the shards' format, "tfrecord" or "array_record" (tfds_corpus.py).
    progress: show a tqdm progress bar on stderr.
  """
  if not sources:
    raise InputError("no --src directory given")
  heldout_fraction = _check_fraction(heldout_fraction)
  tfds_corpus.check_file_format(file_format)
  for s in sources:
    if fileio.is_url(s):
      raise InputError(f"source {s!r}: the builder reads local directories (copy it here first)")
    if not os.path.exists(s):
      raise InputError(f"source {s!r} does not exist")
  if fileio.is_url(out):
    # The builder appends to local shards and state files; a gs:// URL must not become the local
    # folder ./gs:/... either.
    raise InputError(
      f"--out {out!r}: build into a local directory, then copy it to remote "
      "storage (e.g. `gcloud storage cp -r`); training reads a gs:// corpus"
    )
  out = os.path.abspath(out)
  if os.path.exists(out) and not os.path.isdir(out):
    raise InputError(f"--out {out!r} exists and is not a directory")
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise InputError(f"cannot create {out!r}: {e.strerror}") from None
  builder = _Builder(
    sources,
    out,
    _resolve_languages(languages),
    filter_config,
    flush_bytes,
    max_bytes_per_language,
    heldout_fraction,
    file_format,
    progress,
  )
  return builder.run()


def embedded_sources() -> list[str]:
  """Source trees every Debian machine with Python has: the running interpreter's standard library
  (Python), /usr/include (C, C++), /usr/share and /usr/lib (shell, Perl, JavaScript, ...)."""
  candidates = [sysconfig.get_paths()["stdlib"], "/usr/include", "/usr/share", "/usr/lib"]
  return [c for c in candidates if os.path.isdir(c)]


# 512 KiB per language keeps the embedded corpus at a few MB and its build at seconds.
EMBEDDED_BYTES_PER_LANGUAGE = 512 << 10
# A few held-out documents per language even at that size (1% would be one or none).
EMBEDDED_HELDOUT_FRACTION = 0.05


def build_embedded_corpus(
  out: str,
  *,
  heldout_fraction: float = EMBEDDED_HELDOUT_FRACTION,
  file_format: str = tfds_corpus.DEFAULT_FILE_FORMAT,
  progress: bool = True,
) -> dict:
  """The demo corpus: a few MB from `embedded_sources()`, built in seconds, no download."""
  return build_corpus(
    embedded_sources(),
    out,
    max_bytes_per_language=EMBEDDED_BYTES_PER_LANGUAGE,
    heldout_fraction=heldout_fraction,
    file_format=file_format,
    progress=progress,
  )


def load_manifest(corpus_dir: str) -> dict:
  """The manifest of a completed corpus (a local directory or gs://); InputError when there is
  none."""
  path = os.path.join(fileio.resolve(corpus_dir), MANIFEST)
  try:
    if fileio.is_url(path):
      manifest = json.loads(fileio.as_path(path).read_text(encoding="utf-8"))
    else:
      with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
  except FileNotFoundError:
    raise InputError(
      f"{corpus_dir!r} is not a built corpus (no {MANIFEST}); run `geex-data build` first"
    ) from None
  except (OSError, ValueError) as e:
    raise InputError(f"cannot read {path}: {e}") from None
  _check_format(manifest, path)
  if manifest.get("format") != FORMAT or not manifest.get("complete"):
    raise InputError(f"{path} is not a complete {FORMAT} manifest")
  return manifest
