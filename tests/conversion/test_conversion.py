"""conversion/ (geex-convert): round trips, parity with the PyTorch reference from every input
layout, model-parallel shards, and one clear error (exit code 2, nothing left behind) per bad
input."""

import argparse
import pathlib
import struct
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from geex_jax.conversion import cli, convert, table, torch_io
from geex_jax.conversion.torch_reference import CodeGeeXTorch
from geex_jax.model import checkpoints
from geex_jax.model.codegeex import CodeGeeX, CodeGeeXConfig


def tiny(**kw):
  return CodeGeeXConfig.preset("tiny", **kw)


@pytest.fixture(scope="module")
def reference():
  """A tiny PyTorch reference with every parameter random (biases, LayerNorms too)."""
  torch.manual_seed(0)
  ref = CodeGeeXTorch(tiny(scan_layers=False)).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if p.dim() == 1:
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("layernorm.weight") else 0.0))
  return ref


@pytest.fixture(scope="module")
def flat(reference):
  """{released name: fp32 tensor} in the reference's (= the release's) order."""
  return {k: v.detach().clone() for k, v in reference.released_state_dict().items()}


def save_released(path, flat_tensors):
  torch.save(table.nest_released(flat_tensors), path)
  return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, flat):
  """The tiny checkpoint in every input layout: single file, fused QKV, 2 and 4 shards."""
  root = tmp_path_factory.mktemp("inputs")
  out = {
    "single": save_released(root / "single.pt", flat),
    "fused": save_released(root / "fused.pt", table.fuse_released(flat, torch.cat)),
    "fp16": save_released(root / "fp16.pt", {k: v.half() for k, v in flat.items()}),
  }
  for n in (2, 4):
    d = root / f"mp{n}"
    d.mkdir()
    for rank, shard in enumerate(table.split_released(flat, n)):
      # Fuse each rank's local q/k/v too in the 4-way case: both variants combine.
      shard = {k: v.clone() for k, v in shard.items()}
      if n == 4:
        shard = table.fuse_released(shard, torch.cat)
      save_released(d / torch_io.shard_name(rank), shard)
    out[f"mp{n}"] = d
  return out


def run_cli(*argv):
  """Runs geex-convert in-process; returns its exit code (0 when main returns)."""
  try:
    cli.main([str(a) for a in argv])
  except SystemExit as e:
    return e.code
  return 0


def released_of(path):
  return table.flatten_released(torch.load(path, weights_only=True))


def reference_logits(ref, tokens):
  with torch.no_grad():
    return ref(torch.from_numpy(tokens))[0].numpy()


# --- round trips and parity ------------------------------------------------------------------


def test_round_trip_fp32_is_bit_exact(inputs, flat, tmp_path):
  assert run_cli("torch-to-jax", inputs["single"], tmp_path / "jax", "--dtype", "fp32") == 0
  assert run_cli("jax-to-torch", tmp_path / "jax", tmp_path / "back.pt", "--dtype", "fp32") == 0
  back = released_of(tmp_path / "back.pt")
  assert list(back) == list(flat)  # same names in the same order as the release
  for name, tensor in flat.items():
    assert back[name].dtype == torch.float32 and torch.equal(back[name], tensor), name


@pytest.mark.parametrize("jax_dtype", ["fp16", "fp32"])
def test_round_trip_fp16_is_bit_exact(inputs, tmp_path, jax_dtype):
  assert (
    run_cli(
      "torch-to-jax",
      inputs["fp16"],
      tmp_path / "jax",
      "--dtype",
      jax_dtype,
      "--layout",
      "unscanned",
    )
    == 0
  )
  assert run_cli("jax-to-torch", tmp_path / "jax", tmp_path / "back.pt") == 0  # fp16 default
  source, back = released_of(inputs["fp16"]), released_of(tmp_path / "back.pt")
  assert back.keys() == source.keys()
  for name in source:
    assert back[name].dtype == torch.float16 and torch.equal(back[name], source[name]), name


@pytest.mark.parametrize("layout", ["single", "fused", "mp2", "mp4"])
def test_converted_logits_match_reference(inputs, reference, tmp_path, layout):
  dst = tmp_path / "jax"
  assert run_cli("torch-to-jax", inputs[layout], dst, "--dtype", "fp32") == 0
  config, params = checkpoints.load_params(dst)
  assert config.scan_layers and "layers" in params
  assert config.vocab_size == 52224 and config.num_layers == 2 and config.num_heads == 4
  tokens = np.random.RandomState(0).randint(0, 50400, size=(2, 24))
  got = CodeGeeX(config).apply({"params": params}, jnp.asarray(tokens))
  assert np.abs(np.asarray(got) - reference_logits(reference, tokens)).max() <= 1e-4


def test_bf16_default_and_trainer_layouts(inputs, flat, tmp_path):
  dst = tmp_path / "jax"
  assert run_cli("torch-to-jax", inputs["single"], dst, "--preset", "tiny") == 0
  config, params = checkpoints.load_params(dst, scan_layers=False)
  assert config.param_dtype == "bfloat16"
  kernel = params["layers_1"]["mlp"]["dense_h_to_4h"]["kernel"]
  assert kernel.dtype == jnp.bfloat16
  want = flat["transformer.layers.1.mlp.dense_h_to_4h.weight"].numpy().T.astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(kernel), want)


def test_jax_to_torch_shards_split_per_rules_and_load_strict(inputs, flat, reference, tmp_path):
  assert run_cli("torch-to-jax", inputs["single"], tmp_path / "jax", "--dtype", "fp32") == 0
  out = tmp_path / "mp4"
  assert run_cli("jax-to-torch", tmp_path / "jax", out, "--shards", 4, "--dtype", "fp32") == 0
  assert sorted(p.name for p in out.iterdir()) == [torch_io.shard_name(r) for r in range(4)]
  for rank, want in enumerate(table.split_released(flat, 4)):
    got = released_of(out / torch_io.shard_name(rank))
    assert got.keys() == want.keys()
    for name in want:
      assert torch.equal(got[name], want[name]), (rank, name)
  # The shards convert back to the same model.
  assert run_cli("torch-to-jax", out, tmp_path / "again", "--dtype", "fp32", "--verify") == 0


def test_reference_loads_single_file_output_strict(inputs, reference, tmp_path):
  assert run_cli("torch-to-jax", inputs["mp2"], tmp_path / "jax", "--dtype", "fp32") == 0
  assert run_cli("jax-to-torch", tmp_path / "jax", tmp_path / "out.pt", "--dtype", "fp32") == 0
  fresh = CodeGeeXTorch(tiny(scan_layers=False)).eval()
  fresh.load_released(released_of(tmp_path / "out.pt"), strict=True)
  tokens = np.random.RandomState(1).randint(0, 50400, size=(1, 16))
  np.testing.assert_array_equal(
    reference_logits(fresh, tokens), reference_logits(reference, tokens)
  )


@pytest.mark.parametrize("direction", ["torch-to-jax", "jax-to-torch"])
def test_verify_reports_success(inputs, tmp_path, capsys, direction):
  assert run_cli("torch-to-jax", inputs["single"], tmp_path / "jax", "--verify") == 0
  if direction == "jax-to-torch":
    assert run_cli("jax-to-torch", tmp_path / "jax", tmp_path / "o.pt", "--verify") == 0
  out = capsys.readouterr().out
  assert "verify: logits of JAX and the PyTorch reference agree" in out
  assert "tensors" in out and "peak RSS" in out and "MB/s" in out


def test_verify_samples_tensors_for_large_models(inputs, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(convert, "VERIFY_LOGITS_MAX_PARAMS", 0)
  assert run_cli("torch-to-jax", inputs["mp4"], tmp_path / "jax", "--verify") == 0
  assert run_cli("jax-to-torch", tmp_path / "jax", tmp_path / "o", "--shards", 2, "--verify") == 0
  out = capsys.readouterr().out
  assert out.count("sampled tensors are bit-identical to the source") == 2


def test_verify_failure_leaves_nothing(inputs, tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(convert, "_logits_diff", lambda *a: 0.5)
  assert run_cli("torch-to-jax", inputs["single"], tmp_path / "jax", "--verify") == 2
  assert "verify failed" in capsys.readouterr().err
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
  "vocab,verb", [(50400, "trimming 52224 -> 50400"), (52288, "zero-padding 52224 -> 52288")]
)
def test_vocab_trim_and_pad(inputs, flat, tmp_path, capsys, vocab, verb):
  assert (
    run_cli(
      "torch-to-jax", inputs["single"], tmp_path / "jax", "--dtype", "fp32", "--vocab-size", vocab
    )
    == 0
  )
  assert verb in capsys.readouterr().err
  config, params = checkpoints.load_params(tmp_path / "jax")
  table_ = np.asarray(params["word_embeddings"]["embedding"])
  assert config.vocab_size == vocab and table_.shape == (vocab, 64)
  rows = min(vocab, 52224)
  np.testing.assert_array_equal(table_[:rows], flat[convert.WORD_EMBEDDINGS].numpy()[:rows])
  assert not table_[rows:].any()


def test_overwrite_replaces_existing_output(inputs, tmp_path):
  dst = tmp_path / "jax"
  dst.mkdir()
  (dst / "stale").write_text("x")
  assert run_cli("torch-to-jax", inputs["single"], dst, "--overwrite") == 0
  assert not (dst / "stale").exists() and (dst / "config.json").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["jax"]


def test_trust_pickle_admits_extra_python_objects(flat, tmp_path, capsys):
  src = tmp_path / "with_args.pt"
  torch.save({**table.nest_released(flat), "args": argparse.Namespace(lr=1.0)}, src)
  assert run_cli("torch-to-jax", src, tmp_path / "a") == 2
  assert "--trust-pickle" in capsys.readouterr().err
  assert run_cli("torch-to-jax", src, tmp_path / "b", "--trust-pickle") == 0


def test_help_lists_both_directions(capsys):
  assert run_cli("--help") == 0
  text = capsys.readouterr().out
  assert "torch-to-jax" in text and "jax-to-torch" in text
  assert run_cli("torch-to-jax", "--help") == 0
  assert "--dtype {bf16,fp32,fp16}" in capsys.readouterr().out


# --- bad inputs: one line, exit code 2, nothing left behind -----------------------------------


def _bad_sources(root: pathlib.Path, flat: dict, inputs: dict) -> dict:
  def write(name, obj):
    torch.save(obj, root / name)
    return root / name

  good = table.nest_released(flat)
  (root / "notes.txt").write_text("not a checkpoint\n")
  data = inputs["single"].read_bytes()
  (root / "truncated.pt").write_bytes(data[: len(data) // 2])
  missing = dict(flat)
  missing.pop("transformer.layers.1.attention.key.bias")
  shape = dict(flat)
  shape["transformer.layers.1.mlp.dense_h_to_4h.bias"] = torch.zeros(255)
  shards = root / "mp4_gap"
  shards.mkdir()
  for rank, shard in enumerate(table.split_released(flat, 4)):
    if rank != 2:
      torch.save(
        table.nest_released({k: v.clone() for k, v in shard.items()}),
        shards / torch_io.shard_name(rank),
      )
  three = root / "mp3_of_4"
  three.mkdir()
  for rank, shard in enumerate(table.split_released(flat, 4)[:3]):
    torch.save(
      table.nest_released({k: v.clone() for k, v in shard.items()}),
      three / torch_io.shard_name(rank),
    )
  return {
    "missing file": (root / "nope.pt", "no such file"),
    "not a torch file": (root / "notes.txt", "is not a PyTorch checkpoint"),
    "truncated file": (root / "truncated.pt", "is truncated or damaged"),
    "wrong nesting": (
      write("nest.pt", {"model": good["module"]}),
      "wrong nesting: expected key 'module'",
    ),
    "wrong nesting inside": (
      write("nest2.pt", {"module": {"language_model": {"embedding": {"word_embeddings": 1}}}}),
      "wrong nesting: embedding.word_embeddings is a int",
    ),
    "missing key": (
      write("missing.pt", table.nest_released(missing)),
      "missing key transformer.layers.1.attention.key.bias",
    ),
    "extra key": (
      write(
        "extra.pt",
        table.nest_released(
          {**flat, "transformer.layers.1.attention.rotary.weight": torch.zeros(3)}
        ),
      ),
      "unexpected key transformer.layers.1.attention.rotary.weight",
    ),
    "wrong shape": (
      write("shape.pt", table.nest_released(shape)),
      "wrong shape for transformer.layers.1.mlp.dense_h_to_4h.bias: [255], expected [256]",
    ),
    "shard gap": (shards, "inconsistent shard count"),
    "shard count": (three, "inconsistent shard count: 3 shard files"),
    "empty dir": (root / "mp4_gap" / "..", "holds no mp_rank_XX_model_states.pt"),
  }


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory, flat, inputs):
  return _bad_sources(tmp_path_factory.mktemp("bad"), flat, inputs)


BAD = [
  "missing file",
  "not a torch file",
  "truncated file",
  "wrong nesting",
  "wrong nesting inside",
  "missing key",
  "extra key",
  "wrong shape",
  "shard gap",
  "shard count",
  "empty dir",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_torch_input_is_one_line_exit_2_and_leaves_nothing(bad_sources, tmp_path, capsys, case):
  src, message = bad_sources[case]
  out = tmp_path / "out"
  assert run_cli("torch-to-jax", src, out) == 2
  err = capsys.readouterr().err
  assert err.startswith("geex-convert: error: ") and err.count("\n") == 1, err
  assert message in err, err
  assert list(tmp_path.iterdir()) == [], "partial output left behind"


def test_existing_output_without_overwrite(inputs, tmp_path, capsys):
  (tmp_path / "jax").mkdir()
  (tmp_path / "out.pt").write_text("keep me")
  assert run_cli("torch-to-jax", inputs["single"], tmp_path / "jax") == 2
  assert "already exists; pass --overwrite" in capsys.readouterr().err
  assert list((tmp_path / "jax").iterdir()) == []
  assert run_cli("torch-to-jax", inputs["single"], tmp_path / "ok") == 0
  assert run_cli("jax-to-torch", tmp_path / "ok", tmp_path / "out.pt") == 2
  assert "already exists" in capsys.readouterr().err
  assert (tmp_path / "out.pt").read_text() == "keep me"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["jax", "ok", "out.pt"]


def test_bad_jax_input(inputs, tmp_path, capsys):
  assert run_cli("jax-to-torch", tmp_path / "missing", tmp_path / "o.pt") == 2
  assert "checkpoint not found" in capsys.readouterr().err
  assert run_cli("torch-to-jax", inputs["single"], tmp_path / "jax") == 0
  assert run_cli("jax-to-torch", tmp_path / "jax", tmp_path / "o", "--shards", 3) == 2
  assert "cannot split 4 attention heads into 3 shards" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["jax"]


def test_failure_midway_removes_staged_output(inputs, tmp_path, monkeypatch, capsys):
  """An error while tensors are being written (here: a read failing) leaves no partial dir."""
  calls = {"n": 0}
  original = torch_io.TorchSource.load

  def flaky(self, name, *args):
    calls["n"] += 1
    if calls["n"] == 20:
      raise checkpoints.CheckpointError("simulated read failure")
    return original(self, name, *args)

  monkeypatch.setattr(torch_io.TorchSource, "load", flaky)
  assert run_cli("torch-to-jax", inputs["single"], tmp_path / "jax") == 2
  assert capsys.readouterr().err == "geex-convert: error: simulated read failure\n"
  assert list(tmp_path.iterdir()) == []


# --- the pieces ------------------------------------------------------------------------------


def test_writer_pickles_exactly_like_torch_save(tmp_path):
  torch.manual_seed(1)
  state = {
    "a": {"w": torch.randn(3, 5).half()},
    "b": torch.randn(7).bfloat16(),
    "c": torch.randn(2, 2, 2),
  }
  torch.save(state, tmp_path / "ref.pt")

  def placeholders(d):
    return {
      k: placeholders(v) if isinstance(v, dict) else torch_io.placeholder(v.shape, v.dtype)
      for k, v in d.items()
    }

  writer = torch_io.TorchZipWriter(tmp_path / "mine.pt", placeholders(state))
  for t in (state["a"]["w"], state["b"], state["c"]):
    writer.write(torch_io.to_numpy(t))
  writer.close()

  def pkl(path):
    with zipfile.ZipFile(path) as z:
      return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))

  assert pkl(tmp_path / "ref.pt") == pkl(tmp_path / "mine.pt")
  for mmap in (False, True):
    got = torch.load(tmp_path / "mine.pt", weights_only=True, mmap=mmap)
    assert torch.equal(got["a"]["w"], state["a"]["w"]) and torch.equal(got["b"], state["b"])
    assert torch.equal(got["c"], state["c"])


def test_split_rules_cover_every_tensor_and_round_trip(flat):
  config = tiny()
  for name, _, _ in table.rows(config):
    assert table.split_axis(name) in (0, 1, None)
  assert table.split_axis("embedding.position_embeddings.weight") is None
  assert table.split_axis("transformer.layers.0.attention.dense.weight") == 1
  assert table.split_axis("transformer.layers.0.attention.dense.bias") is None
  shards = table.split_released(flat, 2)
  q = "transformer.layers.0.attention.query.weight"
  assert torch.equal(torch.cat([s[q] for s in shards]), flat[q])


def test_fused_names_and_parts(flat):
  fused = table.fuse_released(flat, torch.cat)
  qkv = "transformer.layers.0.attention.query_key_value.weight"
  kv = "transformer.topQueryLayer.attention.key_value.bias"
  assert qkv in fused and kv in fused
  assert "transformer.topQueryLayer.attention.query.weight" in fused
  assert table.fused_parts(qkv)[1] == "transformer.layers.0.attention.key.weight"
  assert table.fused_parts(kv) == (
    "transformer.topQueryLayer.attention.key.bias",
    "transformer.topQueryLayer.attention.value.bias",
  )
  assert len(fused) == len(flat) - 2 * 2 * 2 - 1 * 2


def test_writer_records_are_aligned_with_valid_crcs(tmp_path):
  nested = {
    "w": torch_io.placeholder((3, 33), np.float16),
    "b": torch_io.placeholder((5,), torch.float32),
  }
  writer = torch_io.TorchZipWriter(tmp_path / "out.pt", nested)
  writer.write(np.arange(99, dtype=np.float16).reshape(3, 33))
  writer.write(np.ones(5, np.float32))
  writer.close()
  with zipfile.ZipFile(tmp_path / "out.pt") as archive:
    assert archive.testzip() is None  # every CRC checks out
    names = archive.namelist()
    infos = archive.infolist()
  assert names[0] == "out/data.pkl" and names[-2:] == ["out/version", "out/.data/serialization_id"]
  raw = (tmp_path / "out.pt").read_bytes()
  for info in infos:
    if "/data/" in info.filename:  # a storage: its bytes start at a 64-byte offset
      name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
      )
      assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
  back = torch.load(tmp_path / "out.pt", mmap=True, weights_only=True)
  np.testing.assert_array_equal(back["w"].numpy(), np.arange(99, dtype=np.float16).reshape(3, 33))
  np.testing.assert_array_equal(back["b"].numpy(), np.ones(5, np.float32))


@pytest.mark.parametrize(
  "src,dst",
  [
    ("float16", "bfloat16"),
    ("bfloat16", "float16"),
    ("float16", "float32"),
    ("bfloat16", "float32"),
  ],
)
def test_numpy_and_xla_converters_agree(src, dst):
  """Reshape-only tensors are cast by numpy, transposed ones by XLA: every 16-bit pattern
  converts the same both ways (NaN payloads aside)."""
  config = tiny()
  src, dst = np.dtype(jnp.dtype(src)), np.dtype(jnp.dtype(dst))
  x = np.arange(1 << 16, dtype=np.uint16).view(src).reshape(256, 256)
  by_numpy = convert._build_converter(table.IDENTITY.to_flax, config, dst, x.shape, src)(x)
  by_xla = convert._build_converter(table.LINEAR.to_flax, config, dst, x.shape, src)(x.T)
  by_xla = np.ascontiguousarray(by_xla)
  nan = np.isnan(by_numpy.astype(np.float32))
  assert (np.isnan(by_xla.astype(np.float32)) == nan).all()
  bits = np.uint16 if dst.itemsize == 2 else np.uint32
  assert (by_numpy.view(bits)[~nan] == by_xla.view(bits)[~nan]).all()
