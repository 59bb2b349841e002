"""geex_jax/data/pipeline.py: packing, mixture shares, host sharding, resumable state."""

import json

import numpy as np
import pytest

from data_fixtures import mixed_tree
from geex_jax.data import catalog, corpus, pipeline
from geex_jax.data.tfds_corpus import DocumentReader
from geex_jax.errors import ConfigError
from geex_jax.tokenizer import load_tokenizer

L, B = 96, 4


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  mixed_tree(root / "src", n_per_lang=20)
  corpus.build_corpus([str(root / "src")], str(root / "corpus"), progress=False)
  return str(root / "corpus")


@pytest.fixture(scope="module")
def mixture(corpus_dir):
  return pipeline.register_corpus_tasks(corpus_dir, None, name="t_bytes", seqio_tasks=False)


def batches(it, n=None):
  out = []
  for b in it:
    out.append(b)
    if n is not None and len(out) == n:
      break
  return out


def flatten(bs, key):
  """The non-padding tokens of `key` over batches, in row order."""
  return np.concatenate([b[key][b["decoder_segment_ids"] > 0] for b in bs])


def documents_of(task_name, corpus_dir):
  """Every document of a task as the pipeline should emit it: tag line, text, EOD."""
  spec = catalog.get(task_name).tasks[0]
  reader = DocumentReader(spec.shards)
  tok = load_tokenizer(None)
  return [
    tok.encode(spec.tag + "\n" + reader[i].decode()) + [tok.eos_id] for i in range(len(reader))
  ]


def test_full_pass_loses_and_duplicates_no_token(mixture, corpus_dir):
  it = pipeline.make_batch_iterator(
    mixture_or_task="t_bytes_python", sequence_length=L, batch_size=B, seed=3, num_epochs=1
  )
  bs = batches(it)
  docs = documents_of("t_bytes_python", corpus_dir)
  targets = flatten(bs, "decoder_target_tokens")
  assert len(targets) == sum(map(len, docs))  # counted: every token once
  # Cut the emitted stream after each EOD: exactly the corpus documents, each once.
  ends = np.nonzero(targets == 256)[0]
  emitted = [tuple(targets[a : b + 1]) for a, b in zip([0, *(ends[:-1] + 1)], ends)]
  assert sorted(emitted) == sorted(tuple(d) for d in docs)
  assert emitted != [tuple(d) for d in docs]  # shuffled, not corpus order
  assert all(b[k].shape == (B, L) for b in bs for k in pipeline.FEATURES)
  assert bs[-1]["decoder_segment_ids"][-1, -1] == 0  # only the last batch is padded
  assert all(np.all(b["decoder_segment_ids"] > 0) for b in bs[:-1])


def test_rows_segments_positions_and_loss_weights(mixture):
  it = pipeline.make_batch_iterator(
    mixture_or_task=mixture, sequence_length=L, batch_size=B, seed=0
  )
  eos = 256
  targets_stream, inputs_stream = [], []
  for b in batches(it, 30):
    assert b["decoder_input_tokens"].dtype == np.int32
    assert b["decoder_loss_weights"].dtype == np.float32
    for r in range(B):
      seg, pos = b["decoder_segment_ids"][r], b["decoder_positions"][r]
      tgt, inp, w = (
        b["decoder_target_tokens"][r],
        b["decoder_input_tokens"][r],
        b["decoder_loss_weights"][r],
      )
      assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
      starts = np.nonzero(np.diff(seg))[0] + 1
      # A new segment starts exactly after a document's EOD, and positions restart there.
      assert np.all(tgt[starts - 1] == eos)
      for s, e in zip([0, *starts], [*starts, L]):
        assert np.array_equal(pos[s:e], np.arange(e - s))
      np.testing.assert_array_equal(w, (inp != eos).astype(np.float32))
      targets_stream.append(tgt)
      inputs_stream.append(inp)
  t = np.concatenate(targets_stream)
  i = np.concatenate(inputs_stream)
  # Inputs are the targets shifted by one across row boundaries; each document starts with EOD.
  np.testing.assert_array_equal(i[1:], np.where(t[:-1] == eos, eos, t[:-1]))


def test_every_document_starts_with_its_tag_line(corpus_dir, tokenizer_dir):
  name = pipeline.register_corpus_tasks(
    corpus_dir, str(tokenizer_dir), name="t_real", seqio_tasks=False
  )
  tok = load_tokenizer(tokenizer_dir)
  it = pipeline.make_batch_iterator(mixture_or_task=name, sequence_length=512, batch_size=2, seed=1)
  targets = flatten(batches(it, 12), "decoder_target_tokens")
  docs = tok.decode(targets).split("<|endoftext|>")[:-1]
  tags = {"// language: C", "# language: Python", "# language: Shell"}
  assert len(docs) > 10
  assert all(d.split("\n", 1)[0] in tags for d in docs)


def test_mixture_shares_match_rates(mixture):
  spec = catalog.get(mixture)
  stream = pipeline.DocumentStream(spec, load_tokenizer(None), seed=7)
  counts = np.zeros(len(spec.tasks))
  for _ in range(10_000):
    counts[stream.next_address()[1]] += 1
  shares, rates = counts / counts.sum(), np.asarray(spec.rates)
  assert np.all(np.abs(shares - rates) < 0.02), (shares, rates)
  # Paper shares renormalised over the corpus's languages (Python 26.67 : C 6.72 : Shell 1.73).
  by_lang = dict(zip([t.language for t in spec.tasks], spec.rates))
  assert by_lang["Python"] == pytest.approx(26.67 / (26.67 + 6.72 + 1.73))


def test_rates_from_overrides(corpus_dir):
  name = pipeline.register_corpus_tasks(
    corpus_dir, None, rates={"python": 1, "c": 1, "sh": 0}, name="t_even", seqio_tasks=False
  )
  spec = catalog.get(name)
  assert [t.language for t in spec.tasks] == ["C", "Python"] and spec.rates == (0.5, 0.5)


def doc_stream(mixture, n, **kw):
  stream = pipeline.DocumentStream(catalog.get(mixture), load_tokenizer(None), seed=5, **kw)
  return [(pos, task, ids.tolist()) for pos, _, task, ids in (stream.next() for _ in range(n))]


def test_two_hosts_are_disjoint_and_cover_the_single_host_stream(mixture):
  single = doc_stream(mixture, 40)
  host0 = doc_stream(mixture, 20, shard_index=0, num_shards=2)
  host1 = doc_stream(mixture, 20, shard_index=1, num_shards=2)
  assert not {p for p, *_ in host0} & {p for p, *_ in host1}
  assert sorted(host0 + host1) == single

  # Batches: the two hosts' tokens together are the single host's tokens over a full pass.
  def all_tokens(**kw):
    it = pipeline.make_batch_iterator(
      mixture_or_task="t_bytes_c", sequence_length=L, batch_size=B, seed=2, num_epochs=1, **kw
    )
    return flatten(batches(it), "decoder_target_tokens")

  one = all_tokens()
  two = np.concatenate(
    [all_tokens(shard_index=0, num_shards=2), all_tokens(shard_index=1, num_shards=2)]
  )
  assert len(one) == len(two) and np.array_equal(np.sort(one), np.sort(two))


@pytest.mark.parametrize("shard_index,num_shards", [(0, 1), (1, 2)])
def test_resume_equals_uninterrupted(mixture, shard_index, num_shards):
  kw = dict(
    mixture_or_task=mixture,
    sequence_length=L,
    batch_size=B,
    seed=11,
    shard_index=shard_index,
    num_shards=num_shards,
  )
  reference = batches(pipeline.make_batch_iterator(**kw), 40)
  it = pipeline.make_batch_iterator(**kw)
  saved = {}
  for step in range(25):
    next(it)
    if step in (0, 7, 24):
      saved[step] = json.loads(json.dumps(it.get_state()))
  for step, state in saved.items():
    fresh = pipeline.make_batch_iterator(**kw)
    fresh.set_state(state)
    for want in reference[step + 1 :]:
      got = next(fresh)
      for k in pipeline.FEATURES:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} after restore at {step}")
  # The initial state restores to the beginning.
  fresh = pipeline.make_batch_iterator(**kw)
  state0 = fresh.get_state()
  next(fresh)
  fresh.set_state(state0)
  np.testing.assert_array_equal(
    next(fresh)["decoder_target_tokens"], reference[0]["decoder_target_tokens"]
  )


def test_state_from_another_configuration_is_refused(mixture):
  a = pipeline.make_batch_iterator(mixture_or_task=mixture, sequence_length=L, batch_size=B, seed=1)
  b = pipeline.make_batch_iterator(mixture_or_task=mixture, sequence_length=L, batch_size=B, seed=2)
  next(a)
  with pytest.raises(ConfigError, match="seed"):
    b.set_state(a.get_state())


def test_deterministic_given_seed(mixture):
  mk = lambda s: next(
    pipeline.make_batch_iterator(mixture_or_task=mixture, sequence_length=L, batch_size=B, seed=s)
  )["decoder_target_tokens"]
  assert np.array_equal(mk(4), mk(4)) and not np.array_equal(mk(4), mk(5))


def test_unknown_name_and_bad_shard(mixture):
  with pytest.raises(ConfigError, match="unknown mixture"):
    pipeline.make_batch_iterator(mixture_or_task="nope", sequence_length=8, batch_size=1, seed=0)
  with pytest.raises(ConfigError, match="shard_index"):
    pipeline.make_batch_iterator(
      mixture_or_task=mixture, sequence_length=8, batch_size=1, seed=0, shard_index=2, num_shards=2
    )


# ---------------------------------------------------------------------------------------------
# The held-out (validation) split.


@pytest.fixture(scope="module")
def heldout_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("heldout")
  mixed_tree(root / "src", n_per_lang=20)
  corpus.build_corpus(
    [str(root / "src")], str(root / "corpus"), heldout_fraction=0.3, progress=False
  )
  return root / "corpus"


def split_documents(spec, split):
  """Every document of `spec`'s split as the pipeline emits it."""
  reader = DocumentReader(spec.split(split).shards)
  tok = load_tokenizer(None)
  return [
    tuple(tok.encode(spec.tag + "\n" + reader[i].decode()) + [tok.eos_id])
    for i in range(len(reader))
  ]


def emitted_documents(it):
  targets = flatten(batches(it), "decoder_target_tokens")
  ends = np.nonzero(targets == 256)[0]
  return [tuple(targets[a : b + 1]) for a, b in zip([0, *(ends[:-1] + 1)], ends)]


def test_validation_split_reads_exactly_the_heldout_documents(heldout_dir):
  from geex_jax.data import batches as batch_sources

  name = pipeline.register_corpus_tasks(str(heldout_dir), None, name="t_held", seqio_tasks=False)
  manifest = corpus.load_manifest(str(heldout_dir))
  for spec in catalog.get(name).tasks:
    info = manifest["languages"][spec.language]
    assert spec.num_validation_documents == info["validation_documents"] > 0
    assert spec.validation_shards == tuple(str(heldout_dir / s) for s in info["validation_shards"])
    kw = dict(mixture_or_task=spec.name, sequence_length=L, batch_size=B, seed=1, num_epochs=1)
    val = emitted_documents(pipeline.make_batch_iterator(split="validation", **kw))
    assert sorted(val) == sorted(split_documents(spec, "validation"))
    train = emitted_documents(pipeline.make_batch_iterator(**kw))
    assert sorted(train) == sorted(split_documents(spec, "train"))
    assert not set(train) & set(val)
  # heldout_batches: one finite source per language with held-out documents.
  sources = batch_sources.heldout_batches(
    batch_size=B, sequence_length=L, seed=0, corpus_dir=str(heldout_dir)
  )
  assert sorted(sources) == ["c", "python", "shell"]
  assert all(0 < len(batches(s)) < 1000 for s in sources.values())
  only = batch_sources.heldout_batches(
    batch_size=B, sequence_length=L, seed=0, mixture_or_task=name, languages=["py"]
  )
  assert list(only) == ["python"]
  # A validation iterator's state is not a training one's.
  it = pipeline.make_batch_iterator(
    mixture_or_task=name, sequence_length=L, batch_size=B, seed=0, split="validation"
  )
  with pytest.raises(ConfigError, match="another data configuration"):
    pipeline.make_batch_iterator(
      mixture_or_task=name, sequence_length=L, batch_size=B, seed=0
    ).set_state(it.get_state())


def test_corpus_without_heldout_documents(heldout_dir, tmp_path):
  """A manifest written before the split (no validation fields) loads with no validation split;
  asking for one is a ConfigError that says to rebuild."""
  import shutil

  from geex_jax.data import batches as batch_sources

  old = tmp_path / "old"
  shutil.copytree(heldout_dir, old)
  manifest = json.loads((old / "manifest.json").read_text())
  manifest.pop("validation_documents")
  for info in manifest["languages"].values():
    for k in [k for k in info if k.startswith("validation_")]:
      del info[k]
  (old / "manifest.json").write_text(json.dumps(manifest))
  name = pipeline.register_corpus_tasks(str(old), None, name="t_old", seqio_tasks=False)
  assert all(
    t.validation_shards == () and t.num_validation_documents == 0 for t in catalog.get(name).tasks
  )
  with pytest.raises(ConfigError, match="no language has held-out documents.*rebuild"):
    batch_sources.heldout_batches(batch_size=B, sequence_length=L, seed=0, mixture_or_task=name)
  with pytest.raises(ConfigError, match="no held-out .* rebuild"):
    batch_sources.pipeline_batches(
      batch_size=B, sequence_length=L, seed=0, mixture_or_task=name, split="validation"
    )
  with pytest.raises(ConfigError, match="unknown split"):
    catalog.get(name).tasks[0].split("test")
