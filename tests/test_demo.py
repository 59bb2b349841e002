"""geex_jax/demo.py: corpus -> train -> checkpoint -> sample, on a short run."""
import gin
import pytest

from geex_jax import checkpoints, demo


@pytest.mark.slow
def test_demo_loss_falls_and_it_samples(tmp_path, capsys):
  gin.clear_config()
  try:
    result, text = demo.run(["--workdir", str(tmp_path), "--steps", "60", "--max_new_tokens",
                             "8", "--gin.train.progress=False"])
  finally:
    gin.clear_config()
  first = result.losses[1]
  last = sum(result.losses[s] for s in range(51, 61)) / 10
  assert last < first - 1.5, (first, last)  # bytes: ln(512) = 6.2 at the start
  assert checkpoints.latest_step(tmp_path / "run") == 60
  out = capsys.readouterr().out
  assert "prompt + completion" in out and "def fibonacci(n):" in out
  assert isinstance(text, str)
