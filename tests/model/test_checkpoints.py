"""model/checkpoints.py: the streaming writer and reader agree with save_params/load_params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geex_jax.model import checkpoints
from geex_jax.errors import CheckpointError
from geex_jax.model.codegeex import CodeGeeXConfig, init_params, stack_layers


def tiny(**kw):
  return CodeGeeXConfig.preset("tiny", **kw)


def lazy_tree(params, produced):
  """LazyArray leaves for an unscanned tree, stacked per layer like the converter writes them."""
  config = tiny()
  stacked = stack_layers(params, config.num_layers)

  def leaf(path, x):
    name = "/".join(str(p.key) for p in path)
    x = np.asarray(x)
    if name.startswith("layers/"):

      def piece(i, x=x, name=name):
        produced.append((name, i))
        return x[i]

      return checkpoints.LazyArray(
        x.shape, x.dtype, tuple((i, lambda i=i: piece(i)) for i in range(len(x)))
      )

    def whole(x=x, name=name):
      produced.append((name, None))
      return x

    return checkpoints.LazyArray(x.shape, x.dtype, ((None, whole),))

  return stacked, jax.tree_util.tree_map_with_path(leaf, stacked)


def test_streaming_write_restores_with_load_params(tmp_path):
  config = tiny()
  params = init_params(config.replace(scan_layers=False), jax.random.key(0))
  produced = []
  stacked, tree = lazy_tree(params, produced)
  assert produced == []  # nothing is materialised before writing
  written = []
  checkpoints.save_params_streaming(tmp_path / "ck", config, tree, on_bytes=written.append)
  leaves = jax.tree.leaves(tree)
  assert len(produced) == sum(len(leaf.pieces) for leaf in leaves)  # each piece exactly once
  assert sum(written) == sum(leaf.nbytes for leaf in leaves)
  loaded_config, loaded = checkpoints.load_params(tmp_path / "ck")
  assert loaded_config == config and "layers" in loaded
  jax.tree.map(np.testing.assert_array_equal, loaded, stacked)
  _, unscanned = checkpoints.load_params(tmp_path / "ck", scan_layers=False)
  jax.tree.map(np.testing.assert_array_equal, unscanned, params)


def test_streaming_writer_rejects_a_wrong_piece(tmp_path):
  bad = {
    "a": checkpoints.LazyArray(
      (2, 3), np.dtype(np.float32), ((None, lambda: np.zeros((3, 2), np.float32)),)
    )
  }
  with pytest.raises(Exception, match="expected float32"):
    checkpoints.save_params_streaming(tmp_path / "ck", tiny(), bad)


@pytest.mark.parametrize("scan", [True, False])
def test_stored_params_reads_save_params_output(tmp_path, scan):
  config = tiny(scan_layers=scan, param_dtype="bfloat16")
  params = init_params(config, jax.random.key(1))
  checkpoints.save_params(tmp_path / "ck", config, params)
  stored = checkpoints.StoredParams(tmp_path / "ck")
  assert stored.config == config
  if scan:
    kernel = params["layers"]["mlp"]["dense_h_to_4h"]["kernel"]
    got = stored.read(("layers", "mlp", "dense_h_to_4h", "kernel"), 1)
    np.testing.assert_array_equal(got, np.asarray(kernel[1]))
  else:
    kernel = params["layers_1"]["mlp"]["dense_h_to_4h"]["kernel"]
    got = stored.read(("layers_1", "mlp", "dense_h_to_4h", "kernel"))
    np.testing.assert_array_equal(got, np.asarray(kernel))
  assert got.dtype == jnp.bfloat16


def test_stored_params_errors(tmp_path):
  with pytest.raises(CheckpointError, match="checkpoint not found"):
    checkpoints.StoredParams(tmp_path / "nothing")
  checkpoints.save_config(tmp_path / "ck", tiny())
  (tmp_path / "ck" / "params").mkdir()
  with pytest.raises(CheckpointError, match="cannot read params"):
    checkpoints.StoredParams(tmp_path / "ck")


def test_streaming_write_is_plain_zarr_that_stock_orbax_restores(tmp_path):
  """Uncompressed: one zarr directory per leaf, each piece one bare chunk file, which the reader
  maps instead of copying; stock Orbax restores the same values."""
  import orbax.checkpoint as ocp

  config = tiny(param_dtype="bfloat16")
  params = jax.tree.map(
    lambda x: np.asarray(x, jnp.bfloat16),
    init_params(config.replace(scan_layers=False), jax.random.key(2)),
  )
  stacked, tree = lazy_tree(params, [])
  checkpoints.save_params_streaming(tmp_path / "ck", config, tree, buffer_bytes=1)
  path = tmp_path / "ck" / "params"
  assert not (path / "manifest.ocdbt").exists()
  kernel = path / "layers.mlp.dense_h_to_4h.kernel"
  assert sorted(p.name for p in kernel.iterdir() if not p.name.startswith(".")) == [
    "0.0.0",
    "1.0.0",
  ]
  with ocp.PyTreeCheckpointer() as ckptr:
    restored = ckptr.restore(path.absolute())
  jax.tree.map(np.testing.assert_array_equal, restored, stacked)
  stored = checkpoints.StoredParams(tmp_path / "ck")
  future = stored.read_async(("layers", "mlp", "dense_h_to_4h", "kernel"), 1)
  assert isinstance(future, checkpoints._Mapped)
  got = future.result()
  assert got.dtype == jnp.bfloat16 and not got.flags.writeable
  np.testing.assert_array_equal(got, stacked["layers"]["mlp"]["dense_h_to_4h"]["kernel"][1])
  whole = stored.read(("word_embeddings", "embedding"))
  np.testing.assert_array_equal(whole, stacked["word_embeddings"]["embedding"])


def test_streaming_write_compressed_goes_through_tensorstore(tmp_path):
  config = tiny()
  params = init_params(config.replace(scan_layers=False), jax.random.key(3))
  stacked, tree = lazy_tree(params, [])
  checkpoints.save_params_streaming(tmp_path / "ck", config, tree, compress=True)
  _, loaded = checkpoints.load_params(tmp_path / "ck")
  jax.tree.map(np.testing.assert_array_equal, loaded, stacked)
  stored = checkpoints.StoredParams(tmp_path / "ck")
  future = stored.read_async(("layers", "mlp", "dense_h_to_4h", "kernel"), 0)
  assert not isinstance(future, checkpoints._Mapped)  # zstd chunks: TensorStore decodes them
  np.testing.assert_array_equal(
    future.result(), stacked["layers"]["mlp"]["dense_h_to_4h"]["kernel"][0]
  )


def test_streaming_writer_stops_at_the_first_failing_piece(tmp_path):
  produced = []

  def piece(i):
    produced.append(i)
    if i == 3:
      raise CheckpointError("piece 3 failed")
    return np.full((4,), i, np.float32)

  tree = {
    "a": checkpoints.LazyArray(
      (40, 4), np.dtype(np.float32), tuple((i, lambda i=i: piece(i)) for i in range(40))
    )
  }
  with pytest.raises(CheckpointError, match="piece 3 failed"):
    checkpoints.save_params_streaming(tmp_path / "ck", tiny(), tree, buffer_bytes=32)
  assert max(produced) < 10  # what was not begun when it failed is skipped


def test_local_paths_stay_local_and_gs_urls_stay_urls(tmp_path, monkeypatch):
  """fileio.as_path is where a path's kind is decided: a relative path becomes the absolute
  local path, a gs:// URL stays that URL (never the local folder ./gs:/bucket/...)."""
  import os
  from geex_jax import fileio
  from geex_jax.errors import InputError

  monkeypatch.chdir(tmp_path)
  local = fileio.as_path("ckpt/run")
  assert not fileio.is_url(local) and os.fspath(local) == str(tmp_path / "ckpt" / "run")
  assert os.fspath(local / "checkpoints") == str(tmp_path / "ckpt" / "run" / "checkpoints")
  remote = fileio.as_path("gs://bucket/run/")
  assert fileio.is_url(remote) and os.fspath(remote) == "gs://bucket/run"
  assert os.fspath(remote / checkpoints.CHECKPOINTS_SUBDIR / "6") == "gs://bucket/run/checkpoints/6"
  assert fileio.resolve("gs://bucket/run") == "gs://bucket/run"
  assert fileio.resolve(remote) == "gs://bucket/run"  # an epath.Path of a URL stays one too
  # load_config looks for config.json up to the bucket, not in "gs://" or "/".
  chain = [os.fspath(p) for p in checkpoints._self_and_parents(remote / "checkpoints" / "6")]
  assert chain == [
    "gs://bucket/run/checkpoints/6",
    "gs://bucket/run/checkpoints",
    "gs://bucket/run",
    "gs://bucket",
  ]
  for url in ("http://host/run", "file:///tmp/run"):
    with pytest.raises(InputError, match="unsupported URL scheme"):
      fileio.as_path(url)

  # Writing a config to gs:// goes to the URL (captured here, no emulator needed).
  written = []
  monkeypatch.setattr(
    fileio, "write_atomic", lambda path, text, **kw: written.append(os.fspath(path))
  )
  checkpoints.save_config("gs://bucket/run", tiny())
  checkpoints.save_config("relative/run", tiny())
  assert written == [
    "gs://bucket/run/config.json",
    str(tmp_path / "relative" / "run" / "config.json"),
  ]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["relative"]  # no ./gs: folder


# Contract tests: StoredParams opens Orbax's on-disk layout itself (leaf names, zarr/OCDBT specs,
# and for uncompressed zarr v2 the bare chunk files it memory-maps). These pin that layout to what
# plain public Orbax writes, so an Orbax upgrade that changes it fails here. The other direction
# (what save_params_streaming writes, plain Orbax restores bit-identically) is
# test_streaming_write_is_plain_zarr_that_stock_orbax_restores above.


def _contract_tree():
  rng = np.random.default_rng(7)
  return {
    "word_embeddings": {"embedding": rng.standard_normal((16, 8)).astype(jnp.bfloat16)},
    "layers": {
      "mlp": {
        "kernel": rng.standard_normal((3, 8, 4)).astype(np.float32),
        "bias": rng.integers(-9, 9, (3, 4)).astype(np.int32),
      }
    },
    "final_layernorm": {"scale": rng.standard_normal((8,)).astype(np.float16)},
  }


def _assert_stored_matches(root, tree):
  stored = checkpoints.StoredParams(root)
  flat = {
    tuple(str(k.key) for k in path): leaf
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }
  assert set(stored.leaves) == set(flat)
  for keys, want in flat.items():
    got = stored.read(keys)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert got.tobytes() == want.tobytes()  # bit-identical
  for i in range(3):  # per-layer reads of a stacked leaf
    got = stored.read(("layers", "mlp", "kernel"), i)
    assert got.tobytes() == tree["layers"]["mlp"]["kernel"][i].tobytes()
  return stored


def test_contract_stored_params_reads_standard_checkpointer_output(tmp_path):
  import orbax.checkpoint as ocp

  tree = _contract_tree()
  checkpoints.save_config(tmp_path / "ck", tiny())
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save((tmp_path / "ck" / "params").absolute(), tree)
  assert (tmp_path / "ck" / "params" / "manifest.ocdbt").exists()  # Orbax's default: OCDBT
  _assert_stored_matches(tmp_path / "ck", tree)


@pytest.mark.parametrize("use_zarr3", [False, True])
@pytest.mark.parametrize("use_compression", [False, True])
def test_contract_stored_params_reads_plain_orbax_zarr(tmp_path, use_zarr3, use_compression):
  import orbax.checkpoint as ocp

  tree = _contract_tree()
  checkpoints.save_config(tmp_path / "ck", tiny())
  handler = ocp.PyTreeCheckpointHandler(
    use_ocdbt=False, use_zarr3=use_zarr3, use_compression=use_compression
  )
  with ocp.Checkpointer(handler) as ckptr:
    ckptr.save((tmp_path / "ck" / "params").absolute(), args=ocp.args.PyTreeSave(tree))
  stored = _assert_stored_matches(tmp_path / "ck", tree)
  # Only uncompressed zarr v2 single-chunk leaves are memory-mapped: the fast path must recognise
  # the chunk files plain Orbax writes (and leave everything else to TensorStore).
  mapped = stored.read_async(("word_embeddings", "embedding"))
  assert isinstance(mapped, checkpoints._Mapped) == (not use_zarr3 and not use_compression)
