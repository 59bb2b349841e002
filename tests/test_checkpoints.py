"""geex_jax/checkpoints.py: the streaming writer and reader agree with save_params/load_params."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geex_jax import checkpoints
from geex_jax.errors import CheckpointError
from geex_jax.model import CodeGeeXConfig, init_params, stack_layers


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
      return checkpoints.LazyArray(x.shape, x.dtype,
                                   tuple((i, lambda i=i: piece(i)) for i in range(len(x))))

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
  bad = {"a": checkpoints.LazyArray((2, 3), np.dtype(np.float32),
                                    ((None, lambda: np.zeros((3, 2), np.float32)),))}
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
