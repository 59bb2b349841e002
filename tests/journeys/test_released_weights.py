"""Journey: released weights -> results, with the console scripts as a user runs them.

A checkpoint in the released PyTorch layout (made by the project's PyTorch reference at a small
shape with the full 52224-row vocabulary: single file, fused-QKV variant, 2 model-parallel shards)
-> `geex-convert torch-to-jax --verify` -> `geex-sample` with the released tokenizer (greedy text
equals the PyTorch reference's greedy decode, detokenized) -> `geex-eval generate / execute /
report` -> `geex-convert jax-to-torch` -> loads with strict=True into the reference.
"""

import gzip
import json

import numpy as np
import pytest
import torch

from geex_jax.conversion import table, torch_io
from geex_jax.conversion.torch_reference import CodeGeeXTorch, greedy_generate
from geex_jax import stop_rules
from geex_jax.model import checkpoints
from geex_jax.model.codegeex import CodeGeeXConfig
from geex_jax.tokenizer import CodeGeeXTokenizer

from journey_tools import run, run_ok

pytestmark = pytest.mark.slow

# The tiny preset (hidden 64, 2 layers + the top query layer, 52224-row vocabulary) with room
# for HumanEval-X prompts.
CONFIG = CodeGeeXConfig.preset("tiny", max_position=1024, scan_layers=False)
PROMPT = "def fibonacci(n):\n    "
EOS = 50256
NEW = 24


@pytest.fixture(scope="module")
def reference():
  torch.manual_seed(0)
  ref = CodeGeeXTorch(CONFIG).eval()
  with torch.no_grad():  # random biases and LayerNorms too, and larger weights: varied tokens
    for name, p in ref.named_parameters():
      if p.dim() == 1:
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("layernorm.weight") else 0.0))
      else:
        p.mul_(5.0)
  return ref


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
  return CodeGeeXTokenizer.from_dir(str(tokenizer_dir))


@pytest.fixture(scope="module")
def released(tmp_path_factory, reference):
  """The reference's weights as the release lays them out: one file, fused QKV, 2 shards."""
  root = tmp_path_factory.mktemp("released")
  flat = {k: v.detach().clone() for k, v in reference.released_state_dict().items()}
  torch.save(table.nest_released(flat), root / "codegeex_tiny.pt")
  torch.save(table.nest_released(table.fuse_released(flat, torch.cat)), root / "fused.pt")
  (root / "mp2").mkdir()
  for rank, shard in enumerate(table.split_released(flat, 2)):
    shard = {k: v.clone() for k, v in shard.items()}
    torch.save(table.nest_released(shard), root / "mp2" / torch_io.shard_name(rank))
  return root


@pytest.fixture(scope="module")
def converted(released, tmp_path_factory):
  """`geex-convert torch-to-jax --verify` from every released layout, into folders that do not
  exist yet (as the README writes it: ckpt/codegeex-13b)."""
  work = tmp_path_factory.mktemp("work")
  out = {}
  for name, src in (
    ("single", released / "codegeex_tiny.pt"),
    ("fused", released / "fused.pt"),
    ("mp2", released / "mp2"),
  ):
    dst = work / "ckpt" / name
    r = run_ok("geex-convert", "torch-to-jax", src, dst, "--dtype", "fp32", "--verify")
    assert "verif" in (r.stdout + r.stderr).lower()
    out[name] = dst
  # The README's default form (bf16, scanned) too.
  run_ok("geex-convert", "torch-to-jax", released / "codegeex_tiny.pt", work / "ckpt" / "bf16")
  out["bf16"] = work / "ckpt" / "bf16"
  out["work"] = work
  return out


def torch_greedy(reference, tokenizer, text, new=NEW):
  ids = tokenizer.encode(text)
  out = greedy_generate(
    reference, torch.tensor([ids]), new, eos_id=EOS, vocab_limit=tokenizer.vocab_size
  )[0].tolist()
  if EOS in out:
    out = out[: out.index(EOS)]
  return tokenizer.decode(out)


def test_every_layout_converts_to_the_same_params(converted):
  _, single = checkpoints.load_params(str(converted["single"]), scan_layers=False)
  for name in ("fused", "mp2"):
    _, other = checkpoints.load_params(str(converted[name]), scan_layers=False)
    for a, b in zip(*(map(np.asarray, __import__("jax").tree.leaves(t)) for t in (single, other))):
      np.testing.assert_array_equal(a, b)
  config, _ = checkpoints.load_params(str(converted["bf16"]))
  assert config.vocab_size == 52224 and config.max_position == 1024


def test_sample_greedy_equals_the_pytorch_reference(converted, reference, tokenizer, tokenizer_dir):
  want = torch_greedy(reference, tokenizer, PROMPT)
  assert want.strip(), "the reference continuation is empty: the test would prove nothing"
  r = run_ok(
    "geex-sample",
    "--checkpoint",
    converted["single"],
    "--tokenizer",
    tokenizer_dir,
    "--prompt",
    PROMPT,
    "--greedy",
    "--max_new_tokens",
    NEW,
  )
  assert r.stdout == want


def test_sample_with_language_applies_its_tag_and_stop_rule(
  converted, reference, tokenizer, tokenizer_dir
):
  want = torch_greedy(reference, tokenizer, "# language: Python\n" + PROMPT)
  from geex_jax.inference.sampler import cut_text

  want = cut_text(want, "python", at_line_start=False)
  r = run_ok(
    "geex-sample",
    "--checkpoint",
    converted["mp2"],
    "--tokenizer",
    tokenizer_dir,
    "--prompt",
    PROMPT,
    "--language",
    "python",
    "--max_new_tokens",
    NEW,
  )
  assert r.stdout == want


def test_sample_tasks_to_output_beam_and_int8(
  converted, reference, tokenizer, tokenizer_dir, humaneval_dir, tmp_path
):
  tasks = tmp_path / "tasks.jsonl"
  with gzip.open(humaneval_dir / "humaneval_cpp.jsonl.gz", "rt") as f:
    problems = [json.loads(line) for _, line in zip(range(2), f)]
  tasks.write_text(
    "".join(json.dumps({"task_id": p["task_id"], "prompt": p["prompt"]}) + "\n" for p in problems)
  )
  out = tmp_path / "samples.jsonl"
  run_ok(
    "geex-sample",
    "--checkpoint",
    converted["fused"],
    "--tokenizer",
    tokenizer_dir,
    "--tasks",
    tasks,
    "--max_new_tokens",
    16,
    "--output",
    out,
  )
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [r["task_id"] for r in records] == ["CPP/0", "CPP/1"]
  assert all(r["language"] == "C++" for r in records)  # inferred from the task ids
  want = torch_greedy(reference, tokenizer, "// language: C++\n" + problems[0]["prompt"], 16)
  assert records[0]["completion"] == stop_rules.truncate("cpp", want, finished=True)

  # Beam search with one beam is greedy decoding; two beams run too.
  greedy = run_ok(
    "geex-sample",
    "--checkpoint",
    converted["single"],
    "--tokenizer",
    tokenizer_dir,
    "--prompt",
    PROMPT,
    "--max_new_tokens",
    12,
  ).stdout
  beam1 = run_ok(
    "geex-sample",
    "--checkpoint",
    converted["single"],
    "--tokenizer",
    tokenizer_dir,
    "--prompt",
    PROMPT,
    "--max_new_tokens",
    12,
    "--beam",
    1,
  ).stdout
  assert beam1 == greedy
  r = run_ok(
    "geex-sample",
    "--checkpoint",
    converted["single"],
    "--tokenizer",
    tokenizer_dir,
    "--prompt",
    PROMPT,
    "--max_new_tokens",
    12,
    "--beam",
    2,
    "--num_samples",
    2,
  )
  assert r.stdout.count("<|endoftext|>") == 1  # two completions, one separator
  r = run_ok(
    "geex-sample",
    "--checkpoint",
    converted["bf16"],
    "--tokenizer",
    tokenizer_dir,
    "--prompt",
    PROMPT,
    "--max_new_tokens",
    12,
    "--dtype",
    "bf16",
    "--int8",
  )
  assert "1 completions, " in r.stderr


def test_eval_generate_execute_report(converted, tokenizer_dir, humaneval_dir):
  work = converted["work"]
  samples = work / "samples.jsonl"
  tasks = ",".join(
    f"{lang}/{i}" for lang in ("Python", "CPP", "Java", "JavaScript", "Go", "Rust") for i in (0, 1)
  )
  gen = (
    "geex-eval",
    "generate",
    "--data",
    humaneval_dir,
    "--checkpoint",
    converted["bf16"],
    "--tokenizer",
    tokenizer_dir,
    "--out",
    samples,
    "--n",
    2,
    "--temperature",
    0.8,
    "--max-new-tokens",
    16,
    "--quiet",
    "--tasks",
    tasks,
  )
  run_ok(*gen)
  lines = [json.loads(line) for line in samples.read_text().splitlines()]
  assert len(lines) == 24 and {r["task_id"] for r in lines} == set(tasks.split(","))
  assert "0 new samples" in run_ok(*gen).stdout  # resumed: nothing left to sample
  run_ok(*gen[:-2], "--pairs", "python:cpp", "--tasks", "Python/0,CPP/0")
  lines = [json.loads(line) for line in samples.read_text().splitlines()]
  assert sum(r.get("source_language") == "python" for r in lines) == 2

  out = work / "eval"
  run_ok("geex-eval", "execute", "--samples", samples, "--data", humaneval_dir, "--out", out)
  results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
  assert len(results) == len(lines)
  summary = json.loads((out / "summary.json").read_text())
  assert set(summary["languages"]) == {"python", "cpp", "java", "js", "go", "rust"}
  skipped = {k: v["skipped"] for k, v in summary["languages"].items() if v.get("skipped")}
  if skipped:  # with GEEX_REQUIRE_TOOLCHAINS=1 (CI) execute itself fails instead
    pytest.skip(f"toolchains missing (scripts/install_toolchains.sh): {skipped}")
  assert all(v["pass@1"] is not None for v in summary["languages"].values())
  r = run_ok("geex-eval", "report", out)
  for png in ("pass_at_k.png", "translation_heatmap.png"):
    assert (out / png).stat().st_size > 1000, png
  assert "pass@1" in r.stdout


def test_back_to_torch_loads_strictly_into_the_reference(converted, reference):
  work = converted["work"]
  back = work / "back" / "codegeex_tiny_back.pt"  # the parent does not exist yet
  run_ok("geex-convert", "jax-to-torch", converted["single"], back, "--dtype", "fp32")
  flat = table.flatten_released(torch.load(back, weights_only=True))
  fresh = CodeGeeXTorch(CONFIG)
  fresh.load_released(flat, strict=True)
  for k, v in reference.released_state_dict().items():
    torch.testing.assert_close(flat[k], v, rtol=0, atol=0)
  shards = work / "back" / "mp2"
  run_ok(
    "geex-convert", "jax-to-torch", converted["single"], shards, "--shards", 2, "--dtype", "fp32"
  )
  assert sorted(p.name for p in shards.iterdir()) == [
    torch_io.shard_name(0),
    torch_io.shard_name(1),
  ]


def test_convert_refuses_an_existing_destination(converted, released):
  r = run("geex-convert", "torch-to-jax", released / "codegeex_tiny.pt", converted["single"])
  assert r.returncode == 2 and r.stderr.count("\n") == 1 and "exists" in r.stderr
