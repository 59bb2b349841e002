"""geex_jax/sampling.py and the geex-sample CLI: parity, strategies, stop rules, sharding, CLI."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conversion import table
from conversion.torch_reference import CodeGeeXTorch, greedy_generate
from geex_jax import checkpoints, partitioning, sampling as S
from geex_jax import model as M
from geex_jax import sampling_cli

NEW = 40


@pytest.fixture(scope="module")
def reference():
  """Tiny PyTorch reference with randomised biases/LayerNorms and the same geex-jax params.

  Weights are normal(0, 0.2) rather than 0.02: at 0.02 the tiny model's greedy output is one
  token repeated, which would make the parity test vacuous.
  """
  torch.manual_seed(0)
  cfg = M.CodeGeeXConfig.preset("tiny", scan_layers=False)
  ref = CodeGeeXTorch(cfg).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if p.dim() == 1:
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("layernorm.weight") else 0.0))
      else:
        p.normal_(0.0, 0.2)
  flat = {k: v.numpy() for k, v in ref.released_state_dict().items()}
  params = jax.tree.map(jnp.asarray, table.released_to_params(flat, cfg))
  cfg = cfg.replace(scan_layers=True)
  return cfg, ref, M.convert_layout(params, cfg, True)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.RandomState(0)
  return [rng.randint(0, 50400, size=n).tolist() for n in (7, 13)]


@pytest.fixture(scope="module")
def greedy(reference, prompts):
  cfg, _, params = reference
  return S.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=-1)


# --- parity and the decode loop -----------------------------------------------------------------


def test_greedy_matches_torch_reference_40_tokens(reference, prompts, greedy):
  _, ref, _ = reference
  assert all(len(set(t)) > 10 for t in greedy.tokens)  # a non-degenerate continuation
  for p, got in zip(prompts, greedy.tokens):
    expected = greedy_generate(ref, torch.tensor([p]), NEW)[0].tolist()
    assert got == expected
  assert greedy.reasons == ["length", "length"] and greedy.steps == NEW


def test_chunks_and_num_samples_do_not_change_greedy(reference, prompts, greedy):
  cfg, _, params = reference
  chunked = S.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=-1, chunk_size=7,
                           host_check=lambda r, t: False)
  assert chunked.tokens == greedy.tokens
  # num_samples repeats the prefilled cache: every copy continues identically.
  rep = S.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=-1, num_samples=3)
  assert rep.tokens == [greedy.tokens[r // 3] for r in range(6)]


def test_eos_ends_rows_and_the_loop_exits_early(reference, prompts, greedy):
  cfg, ref, params = reference
  eos = greedy.tokens[0][5]  # make a greedy token of row 0 the EOS
  k = greedy.tokens[0].index(eos)
  got = S.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=eos)
  assert got.tokens[0] == greedy.tokens[0][:k] and got.reasons[0] == "eos"
  expected = greedy_generate(ref, torch.tensor([prompts[1]]), NEW, eos_id=eos)[0].tolist()
  assert got.tokens[1] == [t for t in expected if t != eos]
  # Both rows ended -> the while loop stopped before max_new_tokens.
  if eos in greedy.tokens[1]:
    assert got.steps < NEW


# --- strategies ---------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(reference, prompts):
  cfg, _, params = reference
  sp = S.SamplingParams(temperature=0.9, top_p=0.95, top_k=100)
  run = lambda seed, **kw: S.generate_ids(cfg, params, prompts, sampling=sp, max_new_tokens=12,
                                          eos_id=-1, num_samples=2, seed=seed, **kw).tokens
  a = run(1)
  assert a == run(1)
  assert a != run(2)
  assert a[0] != a[1]  # samples of one prompt differ
  # A row's randomness depends on its row id only, not on the batch it is in.
  alone = S.generate_ids(cfg, params, [prompts[1]], sampling=sp, max_new_tokens=12, eos_id=-1,
                         num_samples=2, seed=1, row_ids=[2, 3]).tokens
  assert alone == a[2:]


def test_top_k_1_equals_greedy(reference, prompts, greedy):
  cfg, _, params = reference
  got = S.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=-1, seed=5,
                       sampling=S.SamplingParams(temperature=1.3, top_k=1))
  assert got.tokens == greedy.tokens


@pytest.mark.parametrize("vocab", [64, 1024])  # 1024 > TOP_P_FAST_K: fast path and full sort
def test_top_p_keeps_exactly_the_nucleus(vocab):
  probs = np.full(vocab, 0.0625 / (vocab - 4))  # the last 1/16 spread over the other tokens
  probs[[7, 3, 11, 5]] = [0.5, 0.25, 0.125, 0.0625]  # permuted so order comes from the values
  logits = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  for top_p, nucleus in [(0.4, {7}), (0.7, {7, 3}), (0.76, {7, 3, 11}), (0.9, {7, 3, 11, 5}),
                         (1e-6, {7})]:
    kept = set(np.flatnonzero(np.isfinite(np.asarray(S.filter_logits(logits, 0, top_p))[0])))
    assert kept == nucleus, top_p
  # Combined with top-k, the mass is measured on the renormalised top-k distribution:
  # top-2 -> (2/3, 1/3); top_p 0.6 keeps only the first.
  kept = np.isfinite(np.asarray(S.filter_logits(logits, 2, 0.6))[0])
  assert set(np.flatnonzero(kept)) == {7}
  # A flat distribution whose nucleus is wider than the fast path's partial sort.
  flat = jnp.zeros((1, vocab), jnp.float32).at[0, :3].set(-1.0)
  kept = np.isfinite(np.asarray(S.filter_logits(flat, 0, 0.999))[0]).sum()
  assert kept >= vocab - 3
  # Sampling only ever draws nucleus tokens.
  keys = jax.random.split(jax.random.key(0), 2000)
  draws = S.sample_tokens(jnp.repeat(logits, 2000, 0), keys, greedy=False, top_k=0,
                          use_top_p=True, temperature=1.0, top_p=0.7)
  counts = np.bincount(np.asarray(draws), minlength=vocab)
  assert set(np.flatnonzero(counts)) == {7, 3}
  assert 0.6 < counts[7] / 2000 < 0.73  # renormalised: 2/3


def test_beam_width_1_equals_greedy(reference, prompts, greedy):
  cfg, _, params = reference
  got = S.beam_search_ids(cfg, params, prompts, width=1, max_new_tokens=NEW, eos_id=-1,
                          length_penalty=0.0)
  assert [b[0] for b in got.tokens] == greedy.tokens
  eos = greedy.tokens[0][5]
  k = greedy.tokens[0].index(eos)
  got = S.beam_search_ids(cfg, params, prompts[:1], width=1, max_new_tokens=NEW, eos_id=eos,
                          length_penalty=0.0)
  assert got.tokens[0][0] == greedy.tokens[0][:k] and got.ended[0][0]


def test_beam_search_sorted_by_penalised_score(reference, prompts, greedy):
  cfg, _, params = reference
  alpha, width = 1.0, 4
  eos = greedy.tokens[0][3]  # some beams end early, so lengths differ
  got = S.beam_search_ids(cfg, params, prompts, width=width, max_new_tokens=8, eos_id=eos,
                          length_penalty=alpha)
  apply = jax.jit(M.CodeGeeX(cfg).apply)
  for p, seqs, scores, ended in zip(prompts, got.tokens, got.scores, got.ended):
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(s) for s in seqs}) == width  # distinct beams
    # Recompute each beam's log-prob with one full forward (right padding does not affect the
    # earlier positions of a causal model).
    fulls = [seq + ([eos] if end else []) for seq, end in zip(seqs, ended)]
    batch = np.zeros((width, len(p) + 9), np.int32)
    for j, full in enumerate(fulls):
      batch[j, :len(p) + len(full)] = p + full
    logp = jax.nn.log_softmax(apply({"params": params}, jnp.asarray(batch)), axis=-1)
    for j, (full, score) in enumerate(zip(fulls, scores)):
      pos = np.arange(len(p) - 1, len(p) - 1 + len(full))
      total = float(logp[j, pos, np.asarray(full)].sum())
      assert score == pytest.approx(total / len(full) ** alpha, abs=1e-3)
  # Greedy's sequence is a candidate, so the best beam is at least as good.
  assert got.scores[1][0] >= got.scores[1][-1]


class CharTokenizer:
  """A 9-character vocabulary, so random tiny models emit newlines and braces all the time."""
  chars = "ab \t\n{}()"
  eos_id = len(chars)
  vocab_size = len(chars) + 1

  def encode(self, text):
    return [self.chars.index(c) for c in text]

  def decode(self, ids):
    return "".join(self.chars[i] if i < len(self.chars) else "<|endoftext|>" for i in ids)


@pytest.fixture(scope="module")
def char_sampler():
  tok = CharTokenizer()
  # init_std 0.2: at 0.02 a tiny random model's output is close to uniform noise or one token.
  cfg = M.CodeGeeXConfig.preset("tiny", vocab_size=tok.vocab_size, max_position=64,
                                init_std=0.2)
  params = M.init_params(cfg, jax.random.key(1))
  return S.Sampler(cfg, params, tok, max_batch=16)


@pytest.mark.parametrize("language,prompt", [("python", "a(b)\n"), ("cpp", "a(){\n"),
                                             ("python", "ab ")])
def test_sampler_stops_exactly_where_the_text_rules_say(char_sampler, language, prompt):
  """Same seed with and without the rule: the ruled completion is the free one, cut."""
  kw = dict(n=16, temperature=2.0, max_new_tokens=40, seed=3, add_tag=False)
  free = char_sampler.complete_detailed([prompt], **kw)[0]
  ruled = char_sampler.complete_detailed([prompt], language=language, **kw)[0]
  at_start = prompt.endswith("\n")
  fired = 0
  for f, r in zip(free, ruled):
    assert r.text == S.cut_text(f.text, language, (), at_start)
    if r.finish_reason == "stop_rule":
      fired += 1
      assert len(r.tokens) <= len(f.tokens) and r.tokens == f.tokens[:len(r.tokens)]
  assert fired >= 1  # the rule really fired on the device
  stopped = char_sampler.complete_detailed([prompt], stop=["a\n", ")("], **kw)[0]
  for f, s in zip(free, stopped):
    assert s.text == S.cut_text(f.text, None, ["a\n", ")("])


def test_streaming_writes_the_final_text(char_sampler):
  pieces = []
  c = char_sampler.stream("a(b)\n", pieces.append, temperature=1.0, max_new_tokens=40, seed=3,
                          language="python", add_tag=False, stop=["(b"], chunk_size=2)
  assert "".join(pieces) == c.text
  assert len(pieces) >= 1
  batch = char_sampler.complete_detailed(["a(b)\n"], n=1, temperature=1.0, max_new_tokens=40,
                                         seed=3, language="python", add_tag=False, stop=["(b"])
  assert batch[0][0].text == c.text


# --- sharding, checkpoints, the CLI -------------------------------------------------------------


def test_sharded_greedy_matches_unsharded(reference, prompts, greedy):
  cfg, _, params = reference
  mesh = partitioning.make_mesh(data=1, fsdp=1, model=4, devices=jax.devices()[:4])
  sharded = partitioning.shard_params(params, M.param_logical_specs(cfg), mesh)
  kernel = sharded["layers"]["mlp"]["dense_h_to_4h"]["kernel"]
  assert kernel.sharding.spec[-1] == "model"
  got = S.generate_ids(cfg, sharded, prompts, max_new_tokens=NEW, eos_id=-1, mesh=mesh)
  assert got.tokens == greedy.tokens


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, reference):
  cfg, _, params = reference
  path = tmp_path_factory.mktemp("ckpt")
  checkpoints.save_params(path, cfg, params)
  return path


def test_sampler_load_and_complete(checkpoint):
  s = S.Sampler.load(checkpoint, None)  # byte tokenizer: ids < 257
  out = s.complete(["def f(x):\n", "x = 1\n"], n=2, temperature=0.8, top_p=0.95,
                   max_new_tokens=6, language="python", seed=0)
  assert len(out) == 2 and all(len(r) == 2 for r in out)
  assert all(isinstance(t, str) for r in out for t in r)
  # bf16 + int8 load and run too.
  s8 = S.Sampler.load(checkpoint, None, dtype="bf16", int8=True)
  # Restored with the layers unrolled for decoding (see Sampler.load).
  assert s8.params["layers_0"]["attention"]["query"]["kernel_q"].dtype == jnp.int8
  assert len(s8.complete(["x = "], n=1, max_new_tokens=4)[0]) == 1


def _cli(capsys, *args):
  with pytest.raises(SystemExit) as e:
    sampling_cli.main(list(args))
  out = capsys.readouterr()
  return e.value.code, out.out, out.err


def test_cli_prompt_tasks_and_output(checkpoint, tmp_path, capsys):
  code, out, err = _cli(capsys, "--checkpoint", str(checkpoint), "--tokenizer", "bytes",
                        "--prompt", "def f(x):\n", "--max_new_tokens", "6", "--language", "py")
  assert code == 0 and "tokens/s" in err
  s = S.Sampler.load(checkpoint, None)
  assert out == s.complete(["def f(x):\n"], temperature=0, max_new_tokens=6,
                           language="python")[0][0]
  tasks = tmp_path / "tasks.jsonl"
  tasks.write_text(json.dumps({"task_id": "Python/0", "prompt": "def f():\n"}) + "\n"
                   + json.dumps({"task_id": "Python/1", "prompt": "x = 1\n"}) + "\n")
  result = tmp_path / "out.jsonl"
  code, _, _ = _cli(capsys, "--checkpoint", str(checkpoint), "--tokenizer", "bytes", "--tasks",
                    str(tasks), "--temperature", "0.8", "--top_p", "0.95", "--num_samples", "2",
                    "--max_new_tokens", "6", "--output", str(result))
  assert code == 0
  recs = [json.loads(l) for l in result.read_text().splitlines()]
  assert not (tmp_path / "out.jsonl.tmp").exists()
  assert [(r["task_id"], r["sample_index"]) for r in recs] == [
      ("Python/0", 0), ("Python/0", 1), ("Python/1", 0), ("Python/1", 1)]
  assert recs[0]["language"] == "Python" and recs[0]["finish_reason"] in S.FINISH_REASONS
  code, out, _ = _cli(capsys, "--checkpoint", str(checkpoint), "--tokenizer", "bytes",
                      "--prompt", "ab", "--beam", "2", "--num_samples", "2",
                      "--max_new_tokens", "3")
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


@pytest.mark.parametrize("args,message", [
    (["--top_p", "1.5"], "top_p"),
    (["--top_p", "0"], "top_p"),
    (["--temperature", "-1"], "temperature"),
    (["--beam", "0"], "beam"),
    (["--max_new_tokens", "0"], "max_new_tokens"),
    (["--language", "klingon"], "unknown language"),
    (["--prompt_file", "/nonexistent/p.txt"], "cannot read"),
    (["--output", "/nonexistent/dir/out.jsonl"], "output directory does not exist"),
])
def test_cli_bad_input_is_one_line_exit_2(checkpoint, capsys, args, message):
  base = ["--checkpoint", str(checkpoint), "--tokenizer", "bytes"]
  if "--prompt_file" not in args:
    base += ["--prompt", "x"]
  code, _, err = _cli(capsys, *base, *args)
  assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_missing_checkpoint_and_long_prompt(checkpoint, tmp_path, capsys):
  code, _, err = _cli(capsys, "--checkpoint", str(tmp_path / "nope"), "--tokenizer", "bytes",
                      "--prompt", "x")
  assert code == 2 and "checkpoint not found" in err and len(err.strip().splitlines()) == 1
  code, _, err = _cli(capsys, "--checkpoint", str(checkpoint), "--tokenizer", "bytes",
                      "--prompt", "x" * 500)  # tiny: 128 positions
  assert code == 2 and "prompt has 500 tokens" in err and len(err.strip().splitlines()) == 1


# --- several decode steps per while-loop iteration ---------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 8])
def test_steps_per_loop_changes_nothing_but_the_loop(reference, prompts, greedy, k):
  """An inner loop of k steps (overrunning max_new_tokens = 40 by up to k - 1 pad steps) gives
  the same tokens, reasons and step count as one step per iteration, with chunks, EOS and
  seeded sampling."""
  cfg, _, params = reference
  got = S.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=-1, steps_per_loop=k)
  assert got.tokens == greedy.tokens and got.reasons == greedy.reasons and got.steps == NEW
  chunked = S.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=-1, chunk_size=7,
                           host_check=lambda r, t: False, steps_per_loop=k)
  assert chunked.tokens == greedy.tokens
  eos = greedy.tokens[0][5]
  one = S.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=eos)
  many = S.generate_ids(cfg, params, prompts, max_new_tokens=NEW, eos_id=eos, steps_per_loop=k)
  assert (many.tokens, many.reasons) == (one.tokens, one.reasons)
  sp = S.SamplingParams(temperature=0.9, top_p=0.95, top_k=100)
  a, b = (S.generate_ids(cfg, params, prompts, sampling=sp, max_new_tokens=13, eos_id=-1,
                         num_samples=2, seed=4, steps_per_loop=j).tokens for j in (1, k))
  assert a == b


def test_steps_per_loop_falls_back_when_the_prompt_leaves_no_room(reference):
  cfg, _, params = reference
  prompt = [list(range(1, cfg.max_position - 10 + 1))]       # 10 positions left
  one = S.generate_ids(cfg, params, prompt, max_new_tokens=10, eos_id=-1)
  many = S.generate_ids(cfg, params, prompt, max_new_tokens=10, eos_id=-1, steps_per_loop=4)
  assert many.tokens == one.tokens and len(one.tokens[0]) == 10
  with pytest.raises(S.InputError, match="steps_per_loop"):
    S.generate_ids(cfg, params, prompt, max_new_tokens=10, steps_per_loop=0)


def test_sampler_passes_steps_per_loop(char_sampler):
  kw = dict(n=4, temperature=1.0, max_new_tokens=30, seed=3, language="python", add_tag=False,
            stop=["(b"])
  base = char_sampler.complete_detailed(["a(b)\n"], **kw)[0]
  fast = S.Sampler(char_sampler.config, char_sampler.params, char_sampler.tokenizer,
                   steps_per_loop=4).complete_detailed(["a(b)\n"], **kw)[0]
  assert [c.text for c in fast] == [c.text for c in base]
  assert [c.finish_reason for c in fast] == [c.finish_reason for c in base]
