"""geex_jax/humaneval_x/generate.py on the continuous-batching engine (`geex-eval generate
--engine`): the same samples.jsonl as the static Sampler path, first run and resumed with a larger
--n, and clear errors."""

import jax
import pytest

from geex_jax import tokenizer as tok_lib
from geex_jax.humaneval_x import cli, generate
from geex_jax.inference import sampler as S
from geex_jax.model import codegeex as M

# Python/0 and CPP/2 share a batch (two stop rules: the Sampler splits it); the top-level rule
# cuts a random model's Python at once, the brace rule lets C++ run.
TASKS = ["Python/0", "CPP/2", "CPP/4"]
NEW = 12


@pytest.fixture(scope="module")
def data(humaneval_dir):
  if not humaneval_dir.is_dir():
    pytest.skip(f"HumanEval-X not found at {humaneval_dir}")
  return humaneval_dir


@pytest.fixture(scope="module")
def jobs(data):
  return generate.generation_jobs(data, ["python", "cpp"], TASKS)


@pytest.fixture(scope="module")
def sampler():
  tok = tok_lib.load_tokenizer(None)  # byte level
  cfg = M.CodeGeeXConfig.preset("tiny", vocab_size=tok.vocab_size, max_position=1024)
  # max_batch 4 < 2 x 3 samples: the static path splits a batch into several Sampler calls
  return S.Sampler(cfg, M.init_params(cfg, jax.random.key(3)), tok, max_batch=4)


@pytest.fixture(scope="module")
def engine(sampler, jobs):
  eng = generate.start_engine(sampler, jobs, NEW, slots=4, chunk=4)
  eng.max_waiting = 1  # the generator must wait out a full queue, not fail
  yield eng
  eng.stop()


def test_engine_path_writes_the_static_paths_samples(tmp_path, jobs, sampler, engine):
  """n=3 then resumed to n=5, batch size 2 (seeds per batch, row ids per prompt): byte-identical
  files, at temperature 0.8 / top-p 0.95 as the paper samples."""
  static, eng = tmp_path / "static.jsonl", tmp_path / "engine.jsonl"
  complete = generate.sampler_complete(sampler)
  args = (0.8, 0.95, NEW)
  for n, lines in ((3, 9), (5, 6)):
    assert (
      generate.generate(complete, jobs, static, n, *args, batch_size=2, progress=False) == lines
    )
    got = generate.generate_with_engine(engine, jobs, eng, n, *args, batch_size=2, progress=False)
    assert got == lines
    assert eng.read_text() == static.read_text()
  texts = static.read_text().splitlines()
  assert len(set(texts)) > 6  # really sampled (not one text repeated)
  assert generate.generate_with_engine(engine, jobs, eng, 5, *args, progress=False) == 0
  assert engine.slots_in_use() == 0 and engine.queue_depth() == 0


def test_engine_flag_refuses_a_custom_sampler(capsys, tmp_path, data):
  argv = ["generate", "--data", str(data), "--out", str(tmp_path / "s.jsonl")]
  argv += ["--checkpoint", "ck", "--tokenizer", "tok", "--engine", "--sampler", "m:f"]
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1
  assert "--engine runs the built-in model; it does not take --sampler" in err[0]
