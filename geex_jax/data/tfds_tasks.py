"""TFDS text datasets as tagged seqio Tasks, to mix into training beside the corpus.

One declarative entry per dataset:

    from geex_jax.data import tfds_tasks

    tfds_tasks.register_tfds_task(tfds_tasks.TfdsTextTask(
      name="my_docs", tfds_name="my_docs:1.0.0", data_dir="/data/tfds",
      text_feature="content", language="Python", splits={"train": "train", "validation": "test"}))
    tfds_tasks.register_mixture("code_and_docs", [("codegeex", 0.9), ("my_docs", 0.1)])

Put these calls in a module and train with --gin.MIXTURE_OR_TASK_MODULE="'that.module'"
--gin.MIXTURE_OR_TASK_NAME="'code_and_docs'" (the corpus mixture 'codegeex' is registered from
CORPUS_DIR before the module is imported). The task's preprocessors are the corpus tasks'
(tasks.py): the language's tag line + "\\n" + the text, tokenized, EOD appended.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional, Sequence, Union

import seqio

from geex_jax import fileio
from geex_jax import languages as langs
from geex_jax.data import tasks
from geex_jax.data.tf_import import import_tf
from geex_jax.data.vocabulary import CodeGeeXVocabulary
from geex_jax.errors import ConfigError

tf = import_tf()


@dataclasses.dataclass(frozen=True)
class TfdsTextTask:
  """A TFDS dataset of text examples as a seqio Task.

  name: the seqio task name. tfds_name: "dataset[/config]:version". data_dir: where the prepared
  dataset lives (None = TFDS's default). text_feature: the example's text field. language: a
  language name or alias (its tag line is prepended). splits: seqio split -> TFDS split (a
  sequence = the same names). tokenizer_dir: the CodeGeeX tokenizer files (None = bytes).
  """

  name: str
  tfds_name: str
  language: str
  text_feature: str = "text"
  data_dir: Optional[str] = None
  splits: Union[Sequence[str], Mapping[str, str]] = ("train",)
  tokenizer_dir: Optional[str] = None


@seqio.map_over_dataset
def _text_of(example, feature: str):
  text = example[feature]
  if text.dtype != tf.string:
    raise ConfigError(f"TFDS feature {feature!r} is {text.dtype.name}, not text")
  return {"text": text}


def register_tfds_task(entry: TfdsTextTask) -> str:
  """(Re)registers `entry` as a seqio Task; returns its name."""
  try:
    lang = langs.get(entry.language)
  except langs.UnknownLanguageError as e:
    raise ConfigError(f"TFDS task {entry.name!r}: {e}") from None
  splits = dict(entry.splits) if isinstance(entry.splits, Mapping) else {s: s for s in entry.splits}
  if not splits:
    raise ConfigError(f"TFDS task {entry.name!r} names no split")
  tokenizer_dir = fileio.resolve(entry.tokenizer_dir) if entry.tokenizer_dir else None
  data_dir = fileio.resolve(entry.data_dir) if entry.data_dir else None
  seqio.TaskRegistry.remove(entry.name)
  seqio.TaskRegistry.add(
    entry.name,
    source=seqio.TfdsDataSource(tfds_name=entry.tfds_name, tfds_data_dir=data_dir, splits=splits),
    preprocessors=[
      functools.partial(_text_of, feature=entry.text_feature),
      functools.partial(tasks.tag_line, tag=lang.tag),
      seqio.preprocessors.tokenize,
      seqio.preprocessors.append_eos,
    ],
    output_features={
      "targets": seqio.Feature(CodeGeeXVocabulary(tokenizer_dir), add_eos=True, dtype=tf.int32)
    },
  )
  return entry.name


def register_mixture(name: str, tasks_and_rates: Sequence[tuple[str, float]]) -> str:
  """(Re)registers the seqio Mixture `name` of registered tasks/mixtures with sampling rates."""
  if not tasks_and_rates or any(r < 0 for _, r in tasks_and_rates):
    raise ConfigError(f"mixture {name!r}: give (task, rate >= 0) pairs, got {tasks_and_rates!r}")
  seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(t, float(r)) for t, r in tasks_and_rates])
  return name
