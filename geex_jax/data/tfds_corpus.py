"""The corpus's TFDS on-disk format: names, the document encoding, shard writers and readers.

A built corpus directory is a TFDS dataset (`tfds.builder_from_directory(corpus_dir)` opens it):
  dataset_info.json, features.json   TFDS metadata: features {"text": Text}, one split per language
  geex_corpus-<split>.<format>-NNNNN   the shards of a split, NNNNN = 0, 1, ...
where the splits are `<slug>` (a language's training documents, e.g. "python", "cpp") and
`<slug>_validation` (its held-out documents), and <format> is "tfrecord" (the default: read by
tf.data and, with one seek per document, by the batch pipeline, on local disks and gs:// alike) or
"array_record" (random access for `tfds.data_sources` and Grain; local disks). Each record is a
serialized tf.train.Example with one bytes feature, "text": the file's UTF-8 text.

Without TensorFlow: examples are encoded and decoded with TFDS's own copy of the Example proto.
"""

from __future__ import annotations

import os
import posixpath
from typing import Iterable, Sequence

from geex_jax import fileio
from geex_jax.data import records
from geex_jax.errors import InputError

DATASET_NAME = "geex_corpus"
VERSION = "1.0.0"
TEXT_FEATURE = "text"
FILE_FORMATS = ("tfrecord", "array_record")
DEFAULT_FILE_FORMAT = "tfrecord"
# TFDS's ShardedFileTemplate syntax (its default, without the shard count); SHARD_INDEX is 5 digits.
# Flat: TFDS finds the shards in the dataset directory itself.
FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}"
_VALIDATION_SUFFIX = "_validation"


def split_name(slug: str, split: str) -> str:
  """The TFDS split holding a language's "train" or "validation" documents."""
  if split == "train":
    return slug
  if split == "validation":
    return slug + _VALIDATION_SUFFIX
  raise ValueError(f"unknown split {split!r}")


def shard_path(slug: str, split: str, index: int, file_format: str) -> str:
  """The corpus-relative path (a file name) of shard `index` of a language's split."""
  name = split_name(slug, split)
  return f"{DATASET_NAME}-{name}.{file_format}-{index:05d}"


def check_file_format(file_format: str) -> str:
  if file_format not in FILE_FORMATS:
    raise InputError(f"file format {file_format!r} is not one of {', '.join(FILE_FORMATS)}")
  return file_format


def _file_format_of(path: str) -> str:
  name = os.path.basename(path)
  for fmt in FILE_FORMATS:
    if f".{fmt}-" in name:
      return fmt
  raise InputError(
    f"{path}: not a corpus shard (expected a .tfrecord-NNNNN or .array_record-NNNNN)"
  )


def _example_pb2():
  from tensorflow_datasets.proto import tf_example_pb2  # TFDS's copy: no TensorFlow import

  return tf_example_pb2


def encode_document(text: bytes) -> bytes:
  """A document as the serialized tf.train.Example {"text": bytes}."""
  pb = _example_pb2()
  example = pb.Example()
  example.features.feature[TEXT_FEATURE].bytes_list.value.append(text)
  return example.SerializeToString()


def decode_document(record: bytes) -> bytes:
  """The UTF-8 text of a serialized document example."""
  example = _example_pb2().Example.FromString(record)
  try:
    return example.features.feature[TEXT_FEATURE].bytes_list.value[0]
  except (KeyError, IndexError):
    raise InputError(f"a corpus record has no {TEXT_FEATURE!r} bytes feature") from None


def write_shard(path: str, texts: Iterable[bytes], file_format: str) -> int:
  """Writes the documents `texts` as one shard, atomically; returns how many."""
  encoded = (encode_document(t) for t in texts)
  if file_format == "tfrecord":
    return records.write_records(path, encoded)
  from array_record.python.array_record_module import ArrayRecordWriter

  n = 0
  with fileio.atomic_path(path) as tmp:
    # group_size 1: every record is one chunk, so reading one document decompresses one record.
    writer = ArrayRecordWriter(tmp, "group_size:1")
    try:
      for record in encoded:
        writer.write(record)
        n += 1
    finally:
      writer.close()
  return n


class _ArrayRecordShards:
  """Random access to the records of several ArrayRecord files, numbered in file order."""

  def __init__(self, paths: Sequence[str]):
    from array_record.python.array_record_module import ArrayRecordReader

    self._readers, self._starts = [], [0]
    for p in paths:
      if fileio.is_url(p):
        raise InputError(
          f"{p}: ArrayRecord shards are read from a local disk; build the corpus with "
          "--file-format tfrecord to train from remote storage"
        )
      try:
        r = ArrayRecordReader(p, "readahead_buffer_size:0")
      except Exception as e:  # the C++ reader raises a bare error for a missing/corrupt file
        raise InputError(f"cannot read corpus shard {p}: {e}") from None
      self._readers.append(r)
      self._starts.append(self._starts[-1] + r.num_records())

  def __len__(self) -> int:
    return self._starts[-1]

  def __getitem__(self, k: int) -> bytes:
    import bisect

    i = bisect.bisect_right(self._starts, k) - 1
    return self._readers[i].read([k - self._starts[i]])[0]

  def close(self) -> None:
    for r in self._readers:
      r.close()
    self._readers = []


class DocumentReader:
  """Random access to the documents (UTF-8 bytes) of a split's shards, numbered in shard order."""

  def __init__(self, paths: Sequence[str]):
    formats = {_file_format_of(p) for p in paths}
    if len(formats) > 1:
      raise InputError(f"a split mixes shard formats ({', '.join(sorted(formats))})")
    if formats == {"array_record"}:
      self._records = _ArrayRecordShards(paths)
    else:
      self._records = records.RecordReader(paths)

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, k: int) -> bytes:
    return decode_document(self._records[k])

  def __iter__(self):
    return (self[k] for k in range(len(self)))

  def close(self) -> None:
    self._records.close()


def _size(path: str) -> int:
  return fileio.as_path(path).stat().length if fileio.is_url(path) else os.path.getsize(path)


def write_dataset_info(corpus_dir: str, manifest: dict) -> None:
  """Writes dataset_info.json and features.json, so that TFDS opens `corpus_dir` as a dataset
  whose splits are the manifest's shards."""
  import tensorflow_datasets as tfds

  file_format = manifest["options"]["file_format"]
  template = tfds.core.ShardedFileTemplate(
    data_dir=corpus_dir,
    template=FILENAME_TEMPLATE,
    dataset_name=DATASET_NAME,
    filetype_suffix=file_format,
  )
  split_infos = []
  for info in manifest["languages"].values():
    for split, prefix in (("train", ""), ("validation", "validation_")):
      shards = info[f"{prefix}shards"]
      if not shards:
        continue
      split_infos.append(
        tfds.core.SplitInfo(
          name=split_name(info["slug"], split),
          shard_lengths=list(info[f"{prefix}shard_documents"]),
          num_bytes=sum(_size(posixpath.join(corpus_dir, s)) for s in shards),
          filename_template=template.replace(split=split_name(info["slug"], split)),
        )
      )
  if not split_infos:
    return  # an empty corpus has no shards for TFDS to describe
  tfds.folder_dataset.write_metadata(
    data_dir=corpus_dir,
    features=tfds.features.FeaturesDict({TEXT_FEATURE: tfds.features.Text()}),
    split_infos=split_infos,
    version=VERSION,
    filename_template=template,
    check_data=False,
    description=(
      "Source files filtered, deduplicated and partitioned by language by `geex-data build` "
      "(geex-jax); one split per language (<slug>) and its held-out documents "
      "(<slug>_validation). See manifest.json for the counts per filter."
    ),
  )
