"""geex_jax/data/tfds_tasks.py: a TFDS text dataset as a tagged seqio Task, mixed in."""

import numpy as np
import pytest

from geex_jax.errors import ConfigError
from geex_jax.tokenizer import load_tokenizer

seqio = pytest.importorskip("seqio")
tfds = pytest.importorskip("tensorflow_datasets")
from geex_jax.data import seqio_batches, tfds_tasks  # noqa: E402

TFDS_NAME = "geex_test_docs"


def texts(split: str, n: int) -> list[str]:
  return [f"def {split}_{i}(x):\n    return x * {i}  # {'pad ' * (i % 7)}\n" for i in range(n)]


def build_tiny_tfds(data_dir) -> str:
  """A TFDS dataset on disk: feature 'content', splits train (12) and test (4)."""
  tfds.dataset_builders.store_as_tfds_dataset(
    name=TFDS_NAME,
    version="1.0.0",
    features=tfds.features.FeaturesDict({"content": tfds.features.Text()}),
    split_datasets={
      "train": [(i, {"content": t}) for i, t in enumerate(texts("train", 12))],
      "test": [(i, {"content": t}) for i, t in enumerate(texts("test", 4))],
    },
    data_dir=str(data_dir),
  )  # prepares it
  return f"{TFDS_NAME}:1.0.0"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  entry = tfds_tasks.TfdsTextTask(
    name="t_tfds_docs",
    tfds_name=build_tiny_tfds(data_dir),
    data_dir=str(data_dir),
    text_feature="content",
    language="python",
    splits={"train": "train", "validation": "test"},
  )
  return tfds_tasks.register_tfds_task(entry)


def test_examples_are_tagged_tokenized_and_end_with_eod(registered):
  tok = load_tokenizer(None)
  task = seqio.get_mixture_or_task(registered)
  for split, tfds_split, n in (("train", "train", 12), ("validation", "test", 4)):
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False)
    got = sorted(ex["targets"].tolist() for ex in ds.as_numpy_iterator())
    want = sorted(
      tok.encode("# language: Python\n" + t) + [tok.eos_id] for t in texts(tfds_split, n)
    )
    assert got == want


def test_mixed_with_another_task_it_feeds_seqio_batches(registered):
  tfds_tasks.register_mixture("t_tfds_mix", [(registered, 1.0)])
  it = seqio_batches.seqio_batches(
    batch_size=2, sequence_length=32, seed=0, mixture_or_task_name="t_tfds_mix"
  )
  b = next(it)
  assert b["decoder_target_tokens"].shape == (2, 32)
  assert b["decoder_input_tokens"][0, 0] == 256 and b["decoder_loss_weights"][0, 0] == 0
  evals = seqio_batches.seqio_eval_batches(
    batch_size=2, sequence_length=32, seed=0, mixture_or_task_name="t_tfds_mix"
  )
  assert list(evals) == [registered]  # not a corpus task: keyed by its task name
  assert np.all(next(evals[registered])["decoder_segment_ids"][:, 0] == 1)


def test_mistakes_are_config_errors():
  with pytest.raises(ConfigError, match="Klingon"):
    tfds_tasks.register_tfds_task(tfds_tasks.TfdsTextTask("t_bad", "x:1.0.0", "Klingon"))
  with pytest.raises(ConfigError, match="no split"):
    tfds_tasks.register_tfds_task(tfds_tasks.TfdsTextTask("t_bad", "x:1.0.0", "C", splits=()))
  with pytest.raises(ConfigError, match="rate"):
    tfds_tasks.register_mixture("t_bad_mix", [])
