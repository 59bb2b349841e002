"""Test setup: 8 simulated CPU devices (sharding tests), TF kept off any GPU, shared data paths."""

import os
import pathlib

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

# The tiny reference model, prompts, greedy ids and checkpoint the decode tests share.
pytest_plugins = ["decode_fixtures"]

REPO = pathlib.Path(__file__).resolve().parents[1]
# Data that lives outside the repository: ../shared beside the checkout, or $GEEX_SHARED.
SHARED = pathlib.Path(os.environ.get("GEEX_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  if not SHARED.is_dir():
    pytest.skip(f"shared data directory not found at {SHARED} (set GEEX_SHARED)")
  return SHARED


@pytest.fixture(scope="session")
def tokenizer_dir(shared_dir) -> pathlib.Path:
  return shared_dir / "codegeex_tokenizer"


@pytest.fixture(scope="session")
def humaneval_dir(shared_dir) -> pathlib.Path:
  return shared_dir / "humaneval_x"
