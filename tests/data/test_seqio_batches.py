"""geex_jax/data/seqio_batches.py: seqio Tasks/Mixtures as the trainer's batch source."""

import json
import types

import numpy as np
import pytest

from data_fixtures import mixed_tree
from geex_jax.data import catalog, corpus, pipeline
from geex_jax.data.tfds_corpus import DocumentReader
from geex_jax.errors import ConfigError
from geex_jax.tokenizer import load_tokenizer

seqio = pytest.importorskip("seqio")
from geex_jax.data import seqio_batches, tasks  # noqa: E402  (TensorFlow behind seqio)

L, B, EOS = 96, 4, 256


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("seqio_batches")
  mixed_tree(root / "src", n_per_lang=8)
  corpus.build_corpus([str(root / "src")], str(root / "corpus"), progress=False)
  return str(root / "corpus")


@pytest.fixture(scope="module")
def mixture(corpus_dir):
  return pipeline.register_corpus_tasks(corpus_dir, None, name="t_sqb")


def source(name, batch_size=B, seed=0, shard_index=0, num_shards=1, **kw):
  return seqio_batches.seqio_batches(
    batch_size=batch_size,
    sequence_length=L,
    seed=seed,
    shard_index=shard_index,
    num_shards=num_shards,
    mixture_or_task_name=name,
    **kw,
  )


def documents(name):
  """Every document of the tasks of `name` as the seqio task emits it: tag line, text, EOD."""
  tok = load_tokenizer(None)
  out = []
  for spec in catalog.get(name).tasks:
    reader = DocumentReader(spec.shards)
    out += [tok.encode(spec.tag + "\n" + reader[i].decode()) + [EOS] for i in range(len(reader))]
  return out


def segments(batches):
  """(targets, inputs, positions, weights) of every segment of every row, in order."""
  out = []
  for b in batches:
    for r in range(len(b["decoder_segment_ids"])):
      seg = b["decoder_segment_ids"][r]
      for s in np.unique(seg[seg > 0]):
        m = seg == s
        keys = ("target_tokens", "input_tokens", "positions", "loss_weights")
        out.append(tuple(b["decoder_" + k][r][m] for k in keys))
  return out


def take(it, n):
  """n batches, with get_state() after each as the trainer calls it (it takes the snapshots)."""
  out = []
  for _ in range(n):
    out.append(next(it))
    it.get_state()
  return out


def test_features_match_the_pipeline_semantics(mixture):
  bs = take(source(mixture), 6)
  docs = {tuple(d) for d in documents(mixture)}
  for b in bs:
    assert set(b) == set(pipeline.FEATURES)
    assert all(b[k].shape == (B, L) for k in b)
    assert all(b[k].dtype == np.int32 for k in b if k != "decoder_loss_weights")
    assert b["decoder_loss_weights"].dtype == np.float32
    seg, inputs = b["decoder_segment_ids"], b["decoder_input_tokens"]
    pad = seg == 0
    assert all(np.all(b[k][pad] == 0) for k in b)  # padding is 0 everywhere, like pipeline.py
    np.testing.assert_array_equal(b["decoder_loss_weights"], (~pad) & (inputs != EOS))
  for targets, inputs, positions, weights in segments(bs):
    # Each segment is one document, cut to the row length (seqio's packing truncates).
    assert any(d[: len(targets)] == tuple(targets) for d in docs)
    assert inputs[0] == EOS and weights[0] == 0  # bos = EOD, no loss predicting from it
    np.testing.assert_array_equal(inputs[1:], targets[:-1])
    np.testing.assert_array_equal(positions, np.arange(len(targets)))
    assert np.all(weights[1:] == 1)


def test_restored_state_continues_bit_identically(mixture):
  """snapshot_every=3: the state after 4 batches is the iterator snapshot of batch 3 + 1 replayed
  batch; the state after 9 (taken from the restored iterator) is a fresh snapshot."""
  it = source(mixture, seed=5, snapshot_every=3)
  take(it, 4)
  state = json.loads(json.dumps(it.get_state()))  # JSON, as the checkpoint keeps it
  assert (state["snapshot_at"], state["served"]) == (3, 4) and state["snapshot"]
  want = take(it, 5)
  resumed = source(mixture, seed=5, snapshot_every=3)
  resumed.set_state(state)
  got = take(resumed, 5)
  for a, b in zip(want, got, strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  state2 = json.loads(json.dumps(resumed.get_state()))
  assert (state2["snapshot_at"], state2["served"]) == (9, 9)
  it.set_state(state2)  # a used iterator rewinds too
  for a, b in zip(take(it, 2), take(resumed, 2), strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_a_state_of_another_configuration_is_refused(mixture):
  state = source(mixture, seed=1).get_state()
  with pytest.raises(ConfigError, match="seed"):
    source(mixture, seed=2).set_state(state)
  with pytest.raises(ConfigError, match="seqio_batches state"):
    source(mixture).set_state({"version": 1, "position": 0})


def test_hosts_read_disjoint_documents(mixture):
  name = mixture + "_python"
  tok_docs = {tuple(d) for d in documents(name)}

  def firsts(shard_index):
    it = source(name, batch_size=2, shard_index=shard_index, num_shards=2, num_epochs=1)
    got = [tuple(t) for t, *_ in segments(list(it))]
    assert all(any(d[: len(t)] == t for d in tok_docs) for t in got)
    return set(got)

  a, b = firsts(0), firsts(1)
  assert a and b and not (a & b)
  assert len(a | b) >= len(tok_docs) - 2  # the remainder rows of the last batch are dropped


def test_eval_batches_per_language_from_the_validation_split(mixture):
  specs = catalog.get(mixture).tasks
  held_out = [
    types.SimpleNamespace(
      **{f: getattr(s, f) for f in ("language", "tag", "shards", "num_documents")},
      name="t_sqv_" + s.name[len(mixture) + 1 :],
      tokenizer_dir=None,
      validation_shards=s.shards,  # the same files, only to have a second split
      num_validation_documents=s.num_documents,
    )
    for s in specs
  ]
  tasks.register_seqio("t_sqv", held_out, [1.0] * len(held_out))
  evals = seqio_batches.seqio_eval_batches(
    batch_size=2, sequence_length=L, seed=0, mixture_or_task_name="t_sqv"
  )
  assert sorted(evals) == sorted(s.name[len(mixture) + 1 :] for s in specs)
  first = evals["python"].get_state()
  a = next(evals["python"])
  evals["python"].set_state(first)  # the EvalHook rewinds to the first state
  np.testing.assert_array_equal(
    next(evals["python"])["decoder_target_tokens"], a["decoder_target_tokens"]
  )
  with pytest.raises(ConfigError, match="'validation' split"):
    seqio_batches.seqio_eval_batches(
      batch_size=2, sequence_length=L, seed=0, mixture_or_task_name=mixture
    )


def test_mistakes_are_config_errors(mixture):
  with pytest.raises(ConfigError, match="unknown seqio mixture or task 'nope'"):
    source("nope")
  with pytest.raises(ConfigError, match="cannot be imported"):
    source(mixture, mixture_or_task_module="no_such_module_xyz")
  with pytest.raises(ConfigError, match="not divisible"):
    source(mixture, batch_size=3, num_shards=2)
  with pytest.raises(ConfigError, match="MIXTURE_OR_TASK_NAME"):
    source(None)


def test_corpus_dir_registers_the_codegeex_mixture(corpus_dir):
  it = source(None, corpus_dir=corpus_dir)
  assert it.get_state()["mixture_or_task"] == "codegeex"
  assert next(it)["decoder_target_tokens"].shape == (B, L)
