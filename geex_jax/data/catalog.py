"""What a task/mixture name stands for, in plain Python (no TensorFlow).

`register_corpus_tasks` records each corpus task here and registers the matching seqio Task and
Mixture; the batch pipeline reads only this catalog, so training never runs TF preprocessing.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from geex_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """One language of one corpus."""

  name: str
  language: str  # registry name ("C++")
  tag: str  # the tag line, without newline
  shards: tuple[str, ...]  # absolute TFRecord paths, in order
  num_documents: int
  tokenizer_dir: Optional[str]  # None = byte-level fallback
  # The held-out split (corpus.is_heldout): absolute TFRecord paths, empty when the corpus has none.
  validation_shards: tuple[str, ...] = ()
  num_validation_documents: int = 0

  def split(self, split: str) -> "TaskSpec":
    """This task reading `split`: "train" (itself) or "validation" (its held-out shards in
    place of the training shards)."""
    if split == "train":
      return self
    if split == "validation":
      return dataclasses.replace(
        self, shards=self.validation_shards, num_documents=self.num_validation_documents
      )
    raise ConfigError(f"unknown split {split!r} (train or validation)")


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
  name: str
  tasks: tuple[TaskSpec, ...]
  rates: tuple[float, ...]  # normalised, aligned with tasks


_TASKS: dict[str, TaskSpec] = {}
_MIXTURES: dict[str, MixtureSpec] = {}


def add_task(spec: TaskSpec) -> None:
  _TASKS[spec.name] = spec


def add_mixture(spec: MixtureSpec) -> None:
  _MIXTURES[spec.name] = spec


def get(name: str) -> MixtureSpec:
  """The mixture `name`, or the task `name` as a mixture of one."""
  if name in _MIXTURES:
    return _MIXTURES[name]
  if name in _TASKS:
    return MixtureSpec(name, (_TASKS[name],), (1.0,))
  known = ", ".join(sorted([*_MIXTURES, *_TASKS])) or "none"
  raise ConfigError(
    f"unknown mixture or task {name!r} (registered: {known}); "
    "call geex_jax.data.pipeline.register_corpus_tasks first"
  )
