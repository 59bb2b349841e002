"""seqio Tasks (one per corpus language) and the Mixture, for seqio/t5x users.

Task `{mixture}_{slug}`: source = the language's TFRecord shards (one tf.train.Example {"text"} per
document; split "train", and "validation" when the corpus holds held-out documents);
preprocessors: prepend the tag line, tokenize, append EOD; output feature "targets". The batch
pipeline (pipeline.py) produces the same documents without TensorFlow; the tests compare them.
Use with `seqio.get_dataset(name, {"targets": L}, feature_converter=...)`; note that seqio's
packing truncates each document to L tokens (pipeline.py does not).
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import seqio

from geex_jax.data import catalog, tfds_corpus
from geex_jax.data.tf_import import import_tf
from geex_jax.data.vocabulary import CodeGeeXVocabulary
from geex_jax.errors import ConfigError

tf = import_tf()


_DOCUMENT = {tfds_corpus.TEXT_FEATURE: tf.io.FixedLenFeature([], tf.string)}


@seqio.map_over_dataset
def tag_line(example, tag: str):
  """{"text"} -> {"targets": TAG + "\\n" + text}: the sample format of CodeGeeX."""
  return {"targets": tf.strings.join([tag + "\n", example["text"]])}


_tag_line = tag_line


def register_seqio(mixture: str, specs: Sequence[catalog.TaskSpec], rates: Sequence[float]) -> None:
  """(Re)registers the seqio Tasks for `specs` and the Mixture `mixture` with `rates`."""
  vocabs = {}
  for spec in specs:
    if any(".array_record-" in os.path.basename(s) for s in spec.shards):
      raise ConfigError(
        f"task {spec.name}: the seqio tasks read TFRecord shards and this corpus holds ArrayRecord "
        "ones; build it with `geex-data build --file-format tfrecord` to train through seqio"
      )
    vocab = vocabs.setdefault(spec.tokenizer_dir, CodeGeeXVocabulary(spec.tokenizer_dir))
    splits = {"train": list(spec.shards)}
    sizes = {"train": spec.num_documents}
    # Held-out documents (catalog.TaskSpec.validation_shards, when the corpus has them).
    validation = tuple(getattr(spec, "validation_shards", ()) or ())
    if validation:
      splits["validation"] = list(validation)
      sizes["validation"] = int(getattr(spec, "num_validation_documents", 0) or 0) or None
    seqio.TaskRegistry.remove(spec.name)
    seqio.TaskRegistry.add(
      spec.name,
      source=seqio.TFExampleDataSource(
        split_to_filepattern=splits,
        feature_description=_DOCUMENT,
        num_input_examples={k: v for k, v in sizes.items() if v is not None},
      ),
      preprocessors=[
        functools.partial(tag_line, tag=spec.tag),
        seqio.preprocessors.tokenize,
        seqio.preprocessors.append_eos,
      ],
      output_features={"targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)},
    )
  seqio.MixtureRegistry.remove(mixture)
  seqio.MixtureRegistry.add(mixture, [(s.name, r) for s, r in zip(specs, rates)])
