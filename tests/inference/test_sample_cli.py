"""geex_jax/inference/cli.py (geex-sample): prompts, task files, JSONL output, beam, and bad
input as one line with exit code 2."""

import json

import pytest

from geex_jax.inference import sampler as S
from geex_jax.inference import cli as sampling_cli
from geex_jax.inference.decoding import FINISH_REASONS


def _cli(capsys, *args):
  with pytest.raises(SystemExit) as e:
    sampling_cli.main(list(args))
  out = capsys.readouterr()
  return e.value.code, out.out, out.err


def test_cli_prompt_tasks_and_output(checkpoint, tmp_path, capsys):
  code, out, err = _cli(
    capsys,
    "--checkpoint",
    str(checkpoint),
    "--tokenizer",
    "bytes",
    "--prompt",
    "def f(x):\n",
    "--max_new_tokens",
    "6",
    "--language",
    "py",
  )
  assert code == 0 and "tokens/s" in err
  s = S.Sampler.load(checkpoint, None)
  assert (
    out == s.complete(["def f(x):\n"], temperature=0, max_new_tokens=6, language="python")[0][0]
  )
  tasks = tmp_path / "tasks.jsonl"
  tasks.write_text(
    json.dumps({"task_id": "Python/0", "prompt": "def f():\n"})
    + "\n"
    + json.dumps({"task_id": "Python/1", "prompt": "x = 1\n"})
    + "\n"
  )
  result = tmp_path / "out.jsonl"
  code, _, _ = _cli(
    capsys,
    "--checkpoint",
    str(checkpoint),
    "--tokenizer",
    "bytes",
    "--tasks",
    str(tasks),
    "--temperature",
    "0.8",
    "--top_p",
    "0.95",
    "--num_samples",
    "2",
    "--max_new_tokens",
    "6",
    "--output",
    str(result),
  )
  assert code == 0
  recs = [json.loads(l) for l in result.read_text().splitlines()]
  assert not (tmp_path / "out.jsonl.tmp").exists()
  assert [(r["task_id"], r["sample_index"]) for r in recs] == [
    ("Python/0", 0),
    ("Python/0", 1),
    ("Python/1", 0),
    ("Python/1", 1),
  ]
  assert recs[0]["language"] == "Python" and recs[0]["finish_reason"] in FINISH_REASONS
  code, out, _ = _cli(
    capsys,
    "--checkpoint",
    str(checkpoint),
    "--tokenizer",
    "bytes",
    "--prompt",
    "ab",
    "--beam",
    "2",
    "--num_samples",
    "2",
    "--max_new_tokens",
    "3",
  )
  assert code == 0 and out.count(sampling_cli.SEPARATOR) == 1


def test_read_tasks_infers_the_language(tmp_path):
  import gzip

  path = tmp_path / "t.jsonl.gz"
  with gzip.open(path, "wt") as f:
    for tid in ("CPP/0", "JavaScript/3", "Rust/1", "misc"):
      f.write(json.dumps({"task_id": tid, "prompt": "x"}) + "\n")
  got = [t["language"] for t in sampling_cli.read_tasks(str(path), None)]
  assert got == ["C++", "JavaScript", "Rust", None]
  assert sampling_cli.read_tasks(str(path), "go")[3]["language"] == "go"


@pytest.mark.parametrize(
  "args,message",
  [
    (["--top_p", "1.5"], "top_p"),
    (["--top_p", "0"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--beam", "0"], "beam"),
    (["--max_new_tokens", "0"], "max_new_tokens"),
    (["--language", "klingon"], "unknown language"),
    (["--prompt_file", "/nonexistent/p.txt"], "cannot read"),
    (["--output", "/nonexistent/dir/out.jsonl"], "output directory does not exist"),
  ],
)
def test_cli_bad_input_is_one_line_exit_2(checkpoint, capsys, args, message):
  base = ["--checkpoint", str(checkpoint), "--tokenizer", "bytes"]
  if "--prompt_file" not in args:
    base += ["--prompt", "x"]
  code, _, err = _cli(capsys, *base, *args)
  assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_missing_checkpoint_and_long_prompt(checkpoint, tmp_path, capsys):
  code, _, err = _cli(
    capsys, "--checkpoint", str(tmp_path / "nope"), "--tokenizer", "bytes", "--prompt", "x"
  )
  assert code == 2 and "checkpoint not found" in err and len(err.strip().splitlines()) == 1
  code, _, err = _cli(
    capsys, "--checkpoint", str(checkpoint), "--tokenizer", "bytes", "--prompt", "x" * 500
  )  # tiny: 128 positions
  assert code == 2 and "prompt has 500 tokens" in err and len(err.strip().splitlines()) == 1
