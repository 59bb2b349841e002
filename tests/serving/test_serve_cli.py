"""`geex-serve` on bad input: one line on stderr, exit code 2, no traceback; --help says the
limits."""

import pytest

from journey_tools import run


@pytest.mark.parametrize(
  "args,message",
  [
    (["--checkpoint", "/nonexistent", "--tokenizer", "bytes"], "checkpoint not found"),
    (["--checkpoint", ".", "--tokenizer", "/nonexistent"], "tokenizer directory not found"),
    (["--checkpoint", ".", "--tokenizer", "bytes", "--port", "0"], "--port"),
    (["--checkpoint", ".", "--tokenizer", "bytes", "--slots", "0"], "--slots"),
    (["--checkpoint", ".", "--tokenizer", "bytes", "--dtype", "fp8"], "invalid choice"),
    (["--tokenizer", "bytes"], "--checkpoint"),
    (["--checkpoint", ".", "--tokenizer", "bytes", "--model_parallel", "99"], "needs that many"),
  ],
)
def test_bad_input_is_one_line(args, message):
  r = run("geex-serve", *args, timeout=120)
  assert r.returncode == 2
  assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
  assert r.stderr.startswith("geex-serve: error:") and message in r.stderr


def test_help_names_routes_and_limits():
  r = run("geex-serve", "--help", timeout=120)
  assert r.returncode == 0
  for text in ("/v1/completions", "/api/v2/multilingual_code_generate", "429", "400", "suffix"):
    assert text in r.stdout
