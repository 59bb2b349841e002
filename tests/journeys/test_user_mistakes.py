"""Journey: the mistakes a user makes end in one `PROG: error: ...` line and exit code 2 (never
a traceback), for every console script, gin-time and train-time errors alike."""

import json

import pytest

from journey_tools import run, run_ok

pytestmark = pytest.mark.slow

TINY = [
  "--gin_file=models/tiny.gin",
  "--gin_file=runs/pretrain.gin",
  "--gin.VOCAB_SIZE=512",
  "--gin.BATCH_SIZE=8",
  "--gin.SEQUENCE_LENGTH=32",
  "--gin.TRAIN_STEPS=2",
  "--gin.train.progress=False",
  "--gin.train.tensorboard=False",
]
SYNTHETIC = [
  "--gin.train.data_source=@synthetic_batches",
  "--gin.CORPUS_DIR=None",
  "--gin.synthetic_batches.vocab_size=512",
]


def assert_one_line_error(r, prog, *needles):
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  lines = [line for line in r.stderr.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
  assert len(errors) == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A trained tiny run (2 steps on synthetic data): a checkpoint to make mistakes with."""
  d = tmp_path_factory.mktemp("run") / "run"
  run_ok("geex-train", *TINY, *SYNTHETIC, f"--gin.MODEL_DIR='{d}'")
  return d


@pytest.mark.parametrize(
  "extra,needles",
  [
    (["--gin.SEQUENCE_LENGTH=4096"], ["sequence_length 4096", "max_position 128"]),
    (["--gin.BATCH_SIZE=6", "--gin.MICROBATCHES=4"], ["not divisible by microbatches 4"]),
    (["--gin.train.mesh_shape=(3, 1, 1)"], ["mesh_shape", "3"]),
    (["--gin.NOT_A_THING.foo=1"], ["gin:", "NOT_A_THING"]),
    (["--gin.train.learning_rate=1"], ["gin:", "learning_rate"]),
  ],
  ids=["sequence-too-long", "microbatches", "mesh", "unknown-binding", "unknown-parameter"],
)
def test_train_config_mistakes(tmp_path, extra, needles):
  r = run("geex-train", *TINY, *SYNTHETIC, f"--gin.MODEL_DIR='{tmp_path / 'run'}'", *extra)
  assert_one_line_error(r, "geex-train", *needles)


def test_train_missing_required_corpus_and_init_from(tmp_path):
  r = run("geex-train", *TINY, f"--gin.CORPUS_DIR='{tmp_path}/corpus'")
  assert_one_line_error(r, "geex-train", "MODEL_DIR")
  r = run(
    "geex-train",
    *TINY,
    f"--gin.MODEL_DIR='{tmp_path}/run'",
    f"--gin.CORPUS_DIR='{tmp_path}/no_corpus'",
  )
  assert_one_line_error(r, "geex-train", "no_corpus")
  r = run(
    "geex-train",
    "--gin_file=models/tiny.gin",
    "--gin_file=runs/finetune.gin",
    f"--gin.MODEL_DIR='{tmp_path}/ft'",
    f"--gin.INIT_FROM='{tmp_path}/no_ckpt'",
    "--gin.TOKENIZER_DIR=None",
    *TINY[2:],
    *SYNTHETIC,
  )
  assert_one_line_error(r, "geex-train", "no_ckpt")
  r = run("geex-train")
  assert_one_line_error(r, "geex-train", "--gin_file")
  r = run("geex-train", "--gin_file=models/no_such_size.gin")
  assert_one_line_error(r, "geex-train", "no_such_size.gin")


def test_sample_mistakes(run_dir, tmp_path, tokenizer_dir):
  base = ["--checkpoint", run_dir, "--tokenizer", "bytes"]
  cases = [
    (
      ["--checkpoint", tmp_path / "nothing", "--tokenizer", "bytes", "--prompt", "x"],
      ["checkpoint not found"],
    ),
    ([*base, "--prompt", "x", "--top_p", "1.5"], ["top_p"]),
    ([*base, "--prompt", "x", "--temperature", "-1"], ["temperature"]),
    ([*base, "--prompt", "x", "--beam", "0"], ["beam"]),
    ([*base, "--prompt", "x", "--seed", "3000000000000"], ["seed"]),
    ([*base, "--prompt", "x", "--model_parallel", "8"], ["does not divide", "model = 8"]),
    ([*base, "--prompt", "x" * 200], ["prompt has", "tokens"]),
    ([*base, "--prompt", "x", "--language", "klingon"], ["klingon"]),
    (
      ["--checkpoint", run_dir, "--tokenizer", tmp_path / "no_tok", "--prompt", "x"],
      ["tokenizer directory not found"],
    ),
    ([*base, "--tasks", tmp_path / "missing.jsonl"], ["missing.jsonl"]),
    (
      [*base, "--prompt", "x", "--output", tmp_path / "no_dir" / "out.jsonl"],
      ["output directory does not exist"],
    ),
    # The released tokenizer has 50400 ids; this model's table has 512 rows.
    (
      ["--checkpoint", run_dir, "--tokenizer", tokenizer_dir, "--prompt", "def f():"],
      ["tokenizer has 50400 ids", "512"],
    ),
  ]
  for args, needles in cases:
    assert_one_line_error(run("geex-sample", *args), "geex-sample", *needles)
  # A seed beyond int32 is fine (it used to overflow the jitted seed).
  run_ok(
    "geex-sample",
    *base,
    "--prompt",
    "x",
    "--seed",
    "3000000000",
    "--max_new_tokens",
    4,
    "--temperature",
    "0.7",
  )


def test_convert_eval_and_data_mistakes(run_dir, tmp_path, humaneval_dir):
  not_torch = tmp_path / "notes.pt"
  not_torch.write_text("not a checkpoint")
  cases = [
    ("geex-convert", ["torch-to-jax", tmp_path / "missing.pt", tmp_path / "out"], ["missing.pt"]),
    ("geex-convert", ["torch-to-jax", not_torch, tmp_path / "out"], ["notes.pt"]),
    ("geex-convert", ["jax-to-torch", tmp_path / "no_run", tmp_path / "x.pt"], ["no_run"]),
    (
      "geex-eval",
      ["execute", "--samples", tmp_path / "none.jsonl", "--data", humaneval_dir],
      ["none.jsonl"],
    ),
    (
      "geex-eval",
      [
        "generate",
        "--data",
        humaneval_dir,
        "--checkpoint",
        run_dir,
        "--tokenizer",
        "bytes",
        "--out",
        tmp_path / "s.jsonl",
        "--pairs",
        "python:klingon",
      ],
      ["klingon"],
    ),
    ("geex-eval", ["selftest", "--data", tmp_path / "no_data"], ["no_data"]),
    (
      "geex-data",
      ["build", "--src", tmp_path / "no_src", "--out", tmp_path / "corpus"],
      ["no_src"],
    ),
  ]
  for prog, args, needles in cases:
    assert_one_line_error(run(prog, *args), prog, *needles)
  assert not (tmp_path / "out").exists() and not (tmp_path / "x.pt").exists()


def test_bad_samples_line_names_file_and_line(tmp_path, humaneval_dir):
  samples = tmp_path / "samples.jsonl"
  samples.write_text(json.dumps({"task_id": "Python/0", "generation": "  pass\n"}) + "\n{oops\n")
  r = run(
    "geex-eval",
    "execute",
    "--samples",
    samples,
    "--data",
    humaneval_dir,
    "--out",
    tmp_path / "eval",
  )
  assert_one_line_error(r, "geex-eval", "samples.jsonl:2")
