"""Weight conversion between the released PyTorch CodeGeeX checkpoints and geex-jax."""
