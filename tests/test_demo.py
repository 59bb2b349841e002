"""geex_jax/demo.py: corpus -> train -> held-out loss -> sample -> convert -> evaluate, on a
few steps of a very small model (the stages, their artifacts and the printed summary)."""

import json

import gin
import numpy as np
import pytest

from geex_jax import demo
from geex_jax.data import tfds_corpus
from geex_jax.model import checkpoints

SMALL = [
  "--gin.HIDDEN_SIZE=32",
  "--gin.NUM_HEADS=2",
  "--gin.FFN_SIZE=64",
  "--gin.NUM_LAYERS=1",
  "--gin.train.progress=False",
  "--gin.train.tensorboard=False",
]


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("GEEX_SHARED", str(tmp_path / "no_shared"))  # its own problems
  gin.clear_config()
  try:
    res = demo.run(
      [
        *("--workdir", str(tmp_path), "--steps", "4", "--max_new_tokens", "8"),
        *(*SMALL, "--gin.train.eval_every=2"),
      ]
    )
  finally:
    gin.clear_config()
  out = capsys.readouterr().out

  # 1. corpus and held-out set: disjoint Python documents.
  corpus = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
  held = json.loads((tmp_path / "heldout" / "manifest.json").read_text())
  assert "Python" in corpus["languages"] and held["languages"]["Python"]["documents"] >= 2
  # 2. training (4 steps, checkpoint) and the held-out loss per byte of the held-out text it
  # scores (tag lines + documents, less each document's first token: its input is EOD, weight 0),
  # beside the entropy of that text's own byte frequencies: an untrained model is near uniform,
  # so it is worse than those.
  assert res.train.step == 4 and checkpoints.latest_step(tmp_path / "run") == 4
  text = b"".join(
    (b"# language: Python\n" + doc)[1:]
    for doc in tfds_corpus.DocumentReader(
      [str(tmp_path / "heldout" / s) for s in held["languages"]["Python"]["shards"]]
    )
  )
  counts = np.bincount(np.frombuffer(text, np.uint8), minlength=256)
  p = counts[counts > 0] / len(text)
  assert res.heldout.bytes == len(text)
  assert res.heldout.unigram_nats_per_byte == pytest.approx(-(p * np.log(p)).sum(), rel=1e-9)
  assert res.heldout.unigram_nats_per_byte < res.heldout.nats_per_byte < 7
  assert "held-out loss" in out and "byte frequencies alone" in out
  # ... and the corpus's validation split, scored during training (steps 2 and 4).
  assert "validation split (per token): step 2 " in out and ", step 4 " in out
  assert "by language: python " in out
  # 3. the completion is printed after its prompt.
  assert "prompt + completion" in out and demo.PROMPT + res.completion in out
  # 4. PyTorch file and the verified checkpoint converted back from it.
  assert res.paths["PyTorch file"].stat().st_size > 0
  config, params = checkpoints.load_params(tmp_path / "converted")
  assert (config.hidden_size, config.num_heads, config.num_layers) == (32, 2, 1)
  _, trained = checkpoints.load_params(tmp_path / "run")
  np.testing.assert_allclose(
    np.asarray(params["word_embeddings"]["embedding"]),
    np.asarray(trained["word_embeddings"]["embedding"]),
    atol=1e-3,
  )  # via fp16
  assert "verify:" in out
  # 5. samples of the three own problems, executed (or skipped without bubblewrap) and reported.
  samples = [json.loads(l) for l in (tmp_path / "samples.jsonl").read_text().splitlines()]
  assert [s["task_id"] for s in samples] == ["Python/0", "Python/1", "Python/2"]
  results = (tmp_path / "eval" / "results.jsonl").read_text().splitlines()
  assert len(results) == 3
  summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
  assert "python" in summary["languages"] and (tmp_path / "eval" / "summary.md").exists()
  if res.eval_skipped:
    assert "programs were not run" in out
  # The closing summary: every artifact and the next commands.
  for name, path in res.paths.items():
    assert str(path) in out, name
  assert "next:" in out and "geex-sample --checkpoint" in out and "geex-eval execute" in out


def test_own_problems_are_humaneval_x_python(tmp_path):
  from geex_jax.humaneval_x import assembly, problems

  d = demo.write_own_problems(tmp_path)
  probs = problems.load_language(d, "python")
  assert list(probs) == ["Python/0", "Python/1", "Python/2"]
  for p in probs.values():  # each canonical solution makes a complete program
    program = assembly.assemble_generation(p, p.canonical_solution).source
    namespace = {}
    exec(compile(program, p.task_id, "exec"), namespace)  # the asserts pass


def test_unknown_argument_is_an_error(capsys):
  with pytest.raises(SystemExit):
    demo.run(["--nope"])
  assert "unrecognized argument --nope" in capsys.readouterr().err
