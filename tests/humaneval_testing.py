"""Test support: skip (or, with GEEX_REQUIRE_TOOLCHAINS=1, fail) when a toolchain is missing."""

from __future__ import annotations

import os
from typing import Iterable

from geex_jax.humaneval_x.executor import Executor


def require(executor: Executor, languages: Iterable[str]) -> None:
  """pytest.skip with the reason when a language cannot run here; pytest.fail in CI."""
  import pytest

  missing = {k: r for k in languages if (r := executor.missing(k))}
  if not missing:
    return
  msg = "; ".join(f"{k}: {r}" for k, r in missing.items())
  if os.environ.get("GEEX_REQUIRE_TOOLCHAINS") == "1":
    pytest.fail(f"HumanEval-X toolchain missing (GEEX_REQUIRE_TOOLCHAINS=1): {msg}")
  pytest.skip(f"HumanEval-X toolchain missing (run scripts/install_toolchains.sh): {msg}")
