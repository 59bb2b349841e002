"""Weight conversion between the released PyTorch CodeGeeX checkpoints and geex-jax.

This folder is installed as the subpackage `geex_jax.conversion` (pyproject.toml's package-dir):
the name table (`table`), reading and writing PyTorch files (`torch_io`), the two directions
(`convert`), the PyTorch reference model for --verify (`torch_reference`) and `geex-convert`
(`cli`). Builds on geex_jax.model and the shared leaves."""
