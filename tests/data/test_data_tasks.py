"""geex_jax/data/tasks.py + vocabulary.py: the seqio Tasks/Mixture agree with the batch pipeline."""

import pytest

from data_fixtures import mixed_tree
from geex_jax.data import catalog, corpus, pipeline
from geex_jax.data.tfds_corpus import DocumentReader
from geex_jax.tokenizer import load_tokenizer

seqio = pytest.importorskip("seqio")


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tokenizer_dir):
  root = tmp_path_factory.mktemp("seqio")
  mixed_tree(root / "src", n_per_lang=6)
  corpus.build_corpus([str(root / "src")], str(root / "corpus"), progress=False)
  return pipeline.register_corpus_tasks(str(root / "corpus"), str(tokenizer_dir), name="t_seqio")


def test_task_documents_equal_the_pipeline_documents(registered, tokenizer_dir):
  tok = load_tokenizer(tokenizer_dir)
  for spec in catalog.get(registered).tasks:
    task = seqio.get_mixture_or_task(spec.name)
    ds = task.get_dataset(sequence_length=None, split="train", shuffle=False)
    got = [ex["targets"].tolist() for ex in ds.as_numpy_iterator()]
    reader = DocumentReader(spec.shards)
    want = [
      tok.encode(spec.tag + "\n" + reader[i].decode()) + [tok.eos_id] for i in range(len(reader))
    ]
    assert got == want


def test_mixture_rates_and_vocabulary(registered, tokenizer_dir):
  mix = seqio.get_mixture_or_task(registered)
  spec = catalog.get(registered)
  assert [t.name for t in mix.tasks] == [t.name for t in spec.tasks]
  for t, r in zip(spec.tasks, spec.rates):
    assert mix.get_rate(seqio.get_mixture_or_task(t.name)) == pytest.approx(r)
  vocab = mix.output_features["targets"].vocabulary
  assert vocab.eos_id == 50256 and vocab.vocab_size == 50400
  import tensorflow as tf

  text = "def f():\n    return 1  # ok"
  ids = vocab.encode_tf(tf.constant(text)).numpy().tolist()
  assert 50268 in ids and ids == vocab.encode(text)
  assert vocab.decode_tf(tf.constant(ids)).numpy().decode() == text
  assert vocab.decode(ids + [50256, 7]) == text  # seqio semantics: stop at EOS


def test_stock_seqio_feature_converter_runs(registered):
  ds = seqio.get_dataset(
    registered,
    {"targets": 64},
    dataset_split="train",
    shuffle=False,
    seed=0,
    feature_converter=seqio.DecoderFeatureConverter(pack=True, bos_id=50256),
  )
  ex = next(ds.as_numpy_iterator())
  assert ex["decoder_target_tokens"].shape == (64,)
  assert ex["decoder_input_tokens"][0] == 50256


def test_held_out_shards_become_the_validation_split(registered):
  """A TaskSpec with validation_shards (catalog.TaskSpec's held-out documents) registers the
  seqio split 'validation' beside 'train'; without them the task has 'train' only."""
  import types

  from geex_jax.data import tasks

  spec = catalog.get(registered).tasks[0]
  assert set(seqio.get_mixture_or_task(spec.name).splits) == {"train"}
  held_out = types.SimpleNamespace(
    **{f: getattr(spec, f) for f in ("language", "tag", "shards", "num_documents")},
    name="t_seqio_heldout",
    tokenizer_dir=spec.tokenizer_dir,
    validation_shards=spec.shards[:1],
    num_validation_documents=3,
  )
  tasks.register_seqio("t_seqio_heldout_mix", [held_out], [1.0])
  task = seqio.get_mixture_or_task("t_seqio_heldout")
  assert set(task.splits) == {"train", "validation"}
  assert task.num_input_examples("validation") == 3
  ds = task.get_dataset(sequence_length=None, split="validation", shuffle=False)
  assert len(list(ds.as_numpy_iterator())) == len(DocumentReader(spec.shards[:1]))
