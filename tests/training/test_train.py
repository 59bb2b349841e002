"""geex_jax/training/: sharding invariance, exact resume, gradient accumulation, multi-host, CLI."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from geex_jax.data import batches
from geex_jax.model import checkpoints
from geex_jax.training import cli as train_cli, metrics as train_metrics, step as step_lib, train
from geex_jax.model.codegeex import CodeGeeXConfig, convert_layout, init_params
from geex_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = CodeGeeXConfig.preset("tiny", vocab_size=128, max_position=32)
SEQ = 32


@pytest.fixture(autouse=True)
def lr_bindings():
  """A schedule that moves the weights in a few steps (the paper's warms up for 2000)."""
  gin.clear_config()
  gin.parse_config(
    [
      "learning_rate_schedule.peak = 3e-3",
      "learning_rate_schedule.warmup_steps = 2",
      "learning_rate_schedule.decay_steps = 40",
    ]
  )
  yield
  gin.clear_config()


def run(model_dir, **kw):
  args = dict(
    model_dir=str(model_dir),
    model=TINY,
    data_source=lambda **a: batches.SyntheticBatches(vocab_size=128, max_doc=24, **a),
    batch_size=16,
    sequence_length=SEQ,
    num_steps=20,
    checkpoint_every=1000,
    progress=False,
    tensorboard=False,
  )
  args.update(kw)
  return train.train(**args)


def test_losses_do_not_depend_on_the_mesh(tmp_path):
  """(data 2, fsdp 2, model 2) == (data 8) == 1 device, 20 steps, fp32."""
  ref = run(tmp_path / "one", num_devices=1)
  losses = np.array([ref.losses[s] for s in range(1, 21)])
  assert losses[-1] < losses[0] - 0.5, losses  # it learns
  for name, mesh in [("dp", (8, 1, 1)), ("mixed", (2, 2, 2))]:
    got = run(tmp_path / name, mesh_shape=mesh)
    np.testing.assert_allclose(
      [got.losses[s] for s in range(1, 21)], losses, rtol=1e-4, err_msg=name
    )
  # The run directory is what load_params reads.
  cfg, params = checkpoints.load_params(tmp_path / "mixed")
  assert cfg == TINY and checkpoints.latest_step(tmp_path / "mixed") == 20


def test_gradient_accumulation_equals_the_whole_batch():
  """4 microbatches of 8 rows == one batch of 32 rows (one update, plain SGD so the comparison
  does not go through Adam's sign-like first step)."""
  source = batches.SyntheticBatches(batch_size=32, sequence_length=SEQ, seed=3, vocab_size=128)
  batch = {k: jnp.asarray(v) for k, v in next(source).items()}
  params = jax.jit(lambda r: init_params(TINY, r))(jax.random.PRNGKey(0))
  opt = optax.sgd(0.5)
  out = {}
  for m in (1, 4):
    state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
    step = jax.jit(step_lib.make_train_step(TINY, opt, lambda s: 0.5, microbatches=m))
    out[m] = step(state, batch, jax.random.PRNGKey(1))
  (s1, m1), (s4, m4) = out[1], out[4]
  np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
  np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(jax.tree.leaves(s1.params)[0], jax.tree.leaves(params)[0])


def test_microbatched_run_matches_and_resumes_from_its_checkpoint(tmp_path):
  a = run(tmp_path / "a", num_steps=6, microbatches=2, mesh_shape=(2, 2, 2), checkpoint_every=3)
  b = run(tmp_path / "b", num_steps=6, mesh_shape=(2, 2, 2))
  np.testing.assert_allclose(
    [a.losses[s] for s in range(1, 7)], [b.losses[s] for s in range(1, 7)], rtol=1e-4
  )
  assert checkpoints.latest_step(tmp_path / "a") == 6


def test_nan_loss_stops_with_the_last_good_checkpoint_kept(tmp_path):
  def poison(step_to_break):
    def update(updates, state, params=None):
      bad = state >= step_to_break
      return jax.tree.map(lambda u: jnp.where(bad, jnp.nan, u), updates), state + 1

    return optax.GradientTransformation(lambda p: jnp.zeros((), jnp.int32), update)

  opt = optax.chain(optax.sgd(0.1), poison(3))
  with pytest.raises(
    train.TrainingDiverged, match=r"diverged at step 4 .*param norm nan.*checkpoint \(step 2\)"
  ):
    run(tmp_path, optimizer=opt, num_steps=10, checkpoint_every=2)
  assert checkpoints.latest_step(tmp_path) == 2
  _, params = checkpoints.load_params(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_init_from_takes_params_only(tmp_path):
  run(tmp_path / "base", num_steps=3)
  _, base = checkpoints.load_params(tmp_path / "base")
  checkpoints.save_params(
    tmp_path / "converted", TINY.replace(scan_layers=False), convert_layout(base, TINY, False)
  )
  got = run(
    tmp_path / "ft", num_steps=1, init_from=str(tmp_path / "converted"), optimizer=optax.sgd(0.0)
  )
  for a, b in zip(jax.tree.leaves(got.state.params), jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, b)
  # Same layout (a trained run dir): restored straight onto the mesh.
  got = run(
    tmp_path / "ft_run",
    num_steps=1,
    init_from=str(tmp_path / "base"),
    optimizer=optax.sgd(0.0),
    mesh_shape=(2, 2, 2),
  )
  for a, b in zip(jax.tree.leaves(got.state.params), jax.tree.leaves(base)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(train.ConfigError, match="another shape"):
    run(
      tmp_path / "ft2",
      num_steps=1,
      init_from=str(tmp_path / "converted"),
      model=TINY.replace(hidden_size=32),
    )


# ---------------------------------------------------------------------------------------------
# Command line and subprocesses.


def cli_args(model_dir, steps, *extra):
  return [
    "--gin_file=models/tiny.gin",
    "--gin_file=runs/pretrain.gin",
    f"--gin.MODEL_DIR='{model_dir}'",
    "--gin.CORPUS_DIR=None",
    "--gin.train.data_source=@synthetic_batches",
    "--gin.synthetic_batches.vocab_size=128",
    "--gin.synthetic_batches.max_doc=24",
    "--gin.VOCAB_SIZE=128",
    "--gin.MAX_POSITION=32",
    "--gin.BATCH_SIZE=16",
    f"--gin.SEQUENCE_LENGTH={SEQ}",
    f"--gin.TRAIN_STEPS={steps}",
    "--gin.learning_rate_schedule.peak=3e-3",
    "--gin.learning_rate_schedule.warmup_steps=2",
    "--gin.learning_rate_schedule.decay_steps=40",
    "--gin.train.tensorboard=False",
    *extra,
  ]


def spawn(args, devices=8, **kw):
  env = dict(
    os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
  )
  return subprocess.Popen(
    [sys.executable, "-m", "geex_jax.training", *args],
    env=env,
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    **kw,
  )


def test_gin_mistakes_are_one_line(tmp_path, capsys):
  for extra, expected in [
    (["--gin.train.no_such_knob=1"], "no_such_knob"),
    (["--gin.MODEL_DIR=%gin.REQUIRED"], "required"),
  ]:
    with pytest.raises(SystemExit) as e:
      train_cli.main(cli_args(tmp_path, 2, *extra))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("geex-train: error:") and expected in err.lower(), (
      err
    )
    assert len(err.splitlines()) == 1, err
    gin.clear_config()


def test_a_resume_with_other_bindings_names_them_unless_allowed(tmp_path, capsys):
  """MODEL_DIR/config.gin holds the run's bindings; a resume that changes what is learned stops
  and names the change; --allow_config_change continues and rewrites config.gin; a longer run
  (TRAIN_STEPS) is not a change."""
  assert train_cli.main(cli_args(tmp_path, 2, "--gin.train.progress=False")) == 0
  saved = (tmp_path / "config.gin").read_text()
  assert "learning_rate_schedule.peak = 0.003" in saved
  gin.clear_config()
  assert train_cli.main(cli_args(tmp_path, 3, "--gin.train.progress=False")) == 0  # longer: fine
  gin.clear_config()
  changed = [*cli_args(tmp_path, 4, "--gin.train.progress=False"), "--gin.make_optimizer.b2=0.9"]
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    train_cli.main(changed)
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1, err
  assert "make_optimizer.b2: 0.95 -> 0.9" in err and "--allow_config_change" in err, err
  assert checkpoints.latest_step(tmp_path) == 3
  gin.clear_config()
  assert train_cli.main([*changed, "--allow_config_change"]) == 0
  assert checkpoints.latest_step(tmp_path) == 4
  assert "make_optimizer.b2 = 0.9" in (tmp_path / "config.gin").read_text()
  assert "config changed on resume" in capsys.readouterr().err
  gin.clear_config()


def test_logical_axis_rules_come_from_gin():
  from geex_jax.model import partitioning
  from geex_jax.model.codegeex import param_logical_specs

  mesh = partitioning.make_mesh(1, 2, 4)
  specs = param_logical_specs(TINY)
  default = partitioning.logical_to_sharding(specs, mesh)
  rules = [(n, None if n == "mlp" else a) for n, a in partitioning.LOGICAL_AXIS_RULES]
  gin.parse_config([f"logical_axis_rules.rules = {rules!r}"])
  bound = partitioning.logical_to_sharding(specs, mesh)
  flat_default = jax.tree.leaves(default)
  flat_bound = jax.tree.leaves(bound)
  changed = [(a.spec, b.spec) for a, b in zip(flat_default, flat_bound) if a.spec != b.spec]
  assert changed and all("model" in str(a) and "model" not in str(b) for a, b in changed)


def test_held_out_evaluation_is_the_mean_token_loss_of_its_batches(tmp_path):
  """train.eval_every: eval_loss in the step's metrics record equals loss_fn on the same batches
  with the params of that step."""
  source = lambda **a: batches.SyntheticBatches(vocab_size=128, max_doc=24, **a)
  result = run(
    tmp_path,
    num_steps=4,
    checkpoint_every=2,
    eval_source=lambda **a: source(**{**a, "seed": 99}),
    eval_every=2,
    eval_batches=2,
  )
  records = train_metrics.read_metrics(tmp_path)
  assert "eval_loss" in records[2] and "eval_loss" in records[4] and "eval_loss" not in records[3]
  _, params = checkpoints.load_params(tmp_path / "checkpoints" / "4", scan_layers=TINY.scan_layers)
  it = source(batch_size=16, sequence_length=SEQ, seed=99, shard_index=0, num_shards=1)
  total = weight = 0.0
  for _ in range(2):
    b = {k: jnp.asarray(v) for k, v in next(it).items()}
    total += float(step_lib.loss_fn(params, b, TINY, jax.random.PRNGKey(0), 1.0)[1])
    weight += float(b["decoder_loss_weights"].sum())
  np.testing.assert_allclose(records[4]["eval_loss"], total / weight, rtol=1e-5)
  assert result.step == 4


class Finite:
  """The first `n` batches of a source, then StopIteration (a held-out set smaller than
  train.eval_batches)."""

  def __init__(self, source, n):
    self.source, self.n, self.i = source, n, 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.i >= self.n:
      raise StopIteration
    self.i += 1
    return next(self.source)

  def get_state(self):
    return {"i": self.i, "inner": self.source.get_state()}

  def set_state(self, state):
    self.i = state["i"]
    self.source.set_state(state["inner"])


def _sums(params, source, n):
  """(loss sum, loss weight) of loss_fn over the first n batches of a source (fewer if it ends)."""
  total = weight = 0.0
  for _, b in zip(range(n), source):
    b = {k: jnp.asarray(v) for k, v in b.items()}
    total += float(step_lib.loss_fn(params, b, TINY, jax.random.PRNGKey(0), 1.0)[1])
    weight += float(b["decoder_loss_weights"].sum())
  return total, weight


def test_named_eval_sources_give_per_source_and_token_weighted_losses(tmp_path, monkeypatch):
  """train.eval_source returning {name: source}: eval_loss/<name> is loss_fn's mean over that
  source's batches (a finite one scores the batches it has), eval_loss the token-weighted mean
  over all; every evaluation rewinds to the same batches, also when a host pads (multi-host)."""
  from geex_jax.model import partitioning
  from geex_jax.training import hooks, state as state_lib

  def sources(seed, **a):
    return {
      "long": batches.SyntheticBatches(vocab_size=128, max_doc=24, **{**a, "seed": 99}),
      "short": Finite(batches.SyntheticBatches(vocab_size=128, max_doc=10, **{**a, "seed": 7}), 1),
    }

  run(tmp_path, num_steps=4, checkpoint_every=2, eval_source=sources, eval_every=2, eval_batches=3)
  records = train_metrics.read_metrics(tmp_path)
  keys = {"eval_loss", "eval_perplexity", "eval_tokens"}
  keys |= {f"{k}/{n}" for k in keys for n in ("long", "short")}
  assert keys <= set(records[2]) and keys <= set(records[4]) and not keys & set(records[3])
  _, params = checkpoints.load_params(tmp_path / "checkpoints" / "4", scan_layers=TINY.scan_layers)
  args = dict(batch_size=16, sequence_length=SEQ, seed=0, shard_index=0, num_shards=1)
  fresh = sources(**args)
  (sl, wl), (ss, ws) = _sums(params, fresh["long"], 3), _sums(params, fresh["short"], 3)
  rec = records[4]
  np.testing.assert_allclose(rec["eval_loss/long"], sl / wl, rtol=1e-5)
  np.testing.assert_allclose(rec["eval_loss/short"], ss / ws, rtol=1e-5)
  np.testing.assert_allclose(rec["eval_perplexity/short"], np.exp(ss / ws), rtol=1e-5)
  assert (rec["eval_tokens/long"], rec["eval_tokens/short"]) == (wl, ws)
  np.testing.assert_allclose(rec["eval_loss"], (sl + ss) / (wl + ws), rtol=1e-5)
  assert abs(rec["eval_loss"] - (sl / wl + ss / ws) / 2) > 1e-4  # weighted, not a plain mean
  # Another host still reading: this one pads the ended source; the numbers do not move.
  monkeypatch.setattr(hooks, "_all_hosts", lambda flag: False)
  mesh = partitioning.make_mesh(-1, 1, 1)
  setup = state_lib.build_state(TINY, mesh, optax.sgd(0.0), lambda s: 0.0)
  hook = hooks.EvalHook(
    sources(**args),
    every=2,
    num_batches=3,
    config=TINY,
    setup=setup,
    batch_size=16,
    sequence_length=SEQ,
  )
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, None)
  for _ in range(2):  # rewound each time
    got = hook.measure(4, state)
    assert hook.counts == {"long": 3, "short": 3}
    for k in keys:
      np.testing.assert_allclose(got[k], rec[k], rtol=1e-5, err_msg=k)


def test_heldout_batches_of_a_corpus_report_each_language(tmp_path):
  """train.eval_source = heldout_batches: eval_loss/<language> for each language of the corpus's
  validation split, eval_loss their token-weighted mean. (That a run reaching no eval step does
  not open the held-out data, the CLI tests show: runs/pretrain.gin binds @heldout_batches with
  CORPUS_DIR = None there.)"""
  import functools

  from data_fixtures import mixed_tree
  from geex_jax.data import corpus

  mixed_tree(tmp_path / "src", n_per_lang=12)
  corpus.build_corpus(
    [str(tmp_path / "src")], str(tmp_path / "corpus"), heldout_fraction=0.3, progress=False
  )
  model = CodeGeeXConfig.preset("tiny", vocab_size=264, max_position=32)  # byte ids (257)

  source = functools.partial(batches.heldout_batches, corpus_dir=str(tmp_path / "corpus"))
  run(tmp_path / "run", model=model, num_steps=2, eval_source=source, eval_every=2, eval_batches=2)
  rec = train_metrics.read_metrics(tmp_path / "run")[2]
  names = ("c", "python", "shell")
  assert all(f"eval_loss/{n}" in rec and f"eval_perplexity/{n}" in rec for n in names), rec
  weighted = sum(rec[f"eval_loss/{n}"] * rec[f"eval_tokens/{n}"] for n in names)
  np.testing.assert_allclose(rec["eval_loss"], weighted / rec["eval_tokens"], rtol=1e-5)
  assert rec["eval_tokens"] == sum(rec[f"eval_tokens/{n}"] for n in names)


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact(tmp_path):
  """30 steps straight == 15+ steps, kill -9, resume to 30: same params bit for bit, same losses."""
  straight = train_cli.main(
    cli_args(
      tmp_path / "straight", 30, "--gin.train.checkpoint_every=5", "--gin.train.progress=False"
    )
  )
  assert straight == 0
  gin.clear_config()
  proc = spawn(
    cli_args(
      tmp_path / "killed",
      30,
      "--gin.train.checkpoint_every=5",
      "--gin.synthetic_batches.delay_s=0.3",
    )
  )
  deadline = time.time() + 300
  while (checkpoints.latest_step(tmp_path / "killed") or 0) < 15:
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  killed_at = checkpoints.latest_step(tmp_path / "killed")
  assert 15 <= killed_at < 30
  resumed = spawn(cli_args(tmp_path / "killed", 30, "--gin.train.checkpoint_every=5"))
  _, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-3000:]
  assert f"resumed from step {killed_at}" in err

  _, p_straight = checkpoints.load_params(tmp_path / "straight")
  _, p_resumed = checkpoints.load_params(tmp_path / "killed")
  for a, b in zip(jax.tree.leaves(p_straight), jax.tree.leaves(p_resumed)):
    np.testing.assert_array_equal(a, b)
  m_straight, m_resumed = (train_metrics.read_metrics(tmp_path / d) for d in ("straight", "killed"))
  assert sorted(m_resumed) == list(range(1, 31))
  assert [m_resumed[s]["loss"] for s in range(1, 31)] == [
    m_straight[s]["loss"] for s in range(1, 31)
  ]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exit(tmp_path):
  proc = spawn(
    cli_args(
      tmp_path, 100, "--gin.train.checkpoint_every=1000", "--gin.synthetic_batches.delay_s=0.2"
    )
  )
  deadline = time.time() + 300
  while (
    not (tmp_path / train_metrics.METRICS_FILE).exists()
    or len(train_metrics.read_metrics(tmp_path)) < 3
  ):
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline
    time.sleep(0.1)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  step = checkpoints.latest_step(tmp_path)
  assert step is not None and 3 <= step < 100 and "preempted" in err
  assert max(train_metrics.read_metrics(tmp_path)) == step


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  """2 processes x 4 CPU devices (gloo collectives) == 1 process x 8 devices."""
  steps = 8
  single = run(tmp_path / "single", num_steps=steps, mesh_shape=(2, 2, 2))
  address = f"localhost:{_free_port()}"
  procs = [
    spawn(
      cli_args(
        tmp_path / "multi",
        steps,
        "--gin.train.mesh_shape=(2, 2, 2)",
        "--gin.train.checkpoint_every=4",
        f"--coordinator_address={address}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      devices=4,
    )
    for i in range(2)
  ]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  got = train_metrics.read_metrics(tmp_path / "multi")
  np.testing.assert_allclose(
    [got[s]["loss"] for s in range(1, steps + 1)],
    [single.losses[s] for s in range(1, steps + 1)],
    rtol=1e-4,
  )
  assert checkpoints.latest_step(tmp_path / "multi") == steps
  _, params = checkpoints.load_params(tmp_path / "multi")
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(single.state.params)):
    # Near-zero weights (biases) differ by float noise that Adam rescales: absolute tolerance.
    np.testing.assert_allclose(a, np.asarray(b), rtol=1e-3, atol=5e-5)


def test_token_ids_beyond_the_vocabulary_are_refused():
  """A tokenizer larger than the model's table (e.g. the real BPE with the demo's 512 rows)."""
  ok = {"decoder_input_tokens": np.array([[0, 511]]), "decoder_target_tokens": np.array([[511, 3]])}
  step_lib.check_token_range(ok, 512)
  bad = {
    "decoder_input_tokens": np.array([[0, 5]]),
    "decoder_target_tokens": np.array([[50256, 3]]),
  }
  with pytest.raises(ConfigError, match="token id 50256 .* 512 rows"):
    step_lib.check_token_range(bad, 512)
