"""geex_jax/training/xla_options.py: gin's XLA options reach XLA_FLAGS before the backend starts."""

import json
import os
import subprocess
import sys

import pytest

from geex_jax.errors import ConfigError
from geex_jax.training import xla_options

# A geex-train whose `train` only reports what the process sees once gin is applied.
_PROBE = """
import json, os, sys
from jax._src import xla_bridge
from geex_jax.training import cli

def probe():
  before = xla_bridge.backends_are_initialized()
  import jax
  print(json.dumps({"flags": os.environ.get("XLA_FLAGS", ""), "backend_before": before,
                    "devices": jax.device_count()}))
  class Done:
    status = "done"
  return Done()

cli.train = probe
sys.exit(cli.main(sys.argv[1:]))
"""


def _geex_train(tmp_path, *bindings):
  gin_file = tmp_path / "x.gin"
  gin_file.write_text("\n".join(bindings) + "\n")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_PLATFORMS"] = "cpu"
  return subprocess.run(
    [sys.executable, "-c", _PROBE, f"--gin_file={gin_file}"],
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_gin_xla_options_are_in_xla_flags_before_the_backend_starts(tmp_path):
  """host_device_count=3 takes effect (3 CPU devices): the flag was set before the backend."""
  proc = _geex_train(
    tmp_path,
    "xla_options.options = {'host_device_count': 3, 'latency_hiding_scheduler': True}",
  )
  assert proc.returncode == 0, proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["devices"] == 3 and not report["backend_before"]
  assert "--xla_force_host_platform_device_count=3" in report["flags"]
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in report["flags"]


def test_an_unknown_option_is_a_one_line_error(tmp_path):
  proc = _geex_train(tmp_path, "xla_options.options = {'warp_speed': True}")
  assert proc.returncode == 2
  assert proc.stderr.strip().count("\n") == 0, proc.stderr
  assert (
    "unknown option(s) 'warp_speed'" in proc.stderr and "latency_hiding_scheduler" in proc.stderr
  )


def test_flag_values_and_raw_flags():
  flags = xla_options.xla_options(
    {"command_buffer": ["FUSION", "CUBLAS"], "while_loop_double_buffering": False},
    extra_flags=["--xla_gpu_foo=1"],
  )
  assert flags == [
    "--xla_gpu_enable_command_buffer=FUSION,CUBLAS",
    "--xla_gpu_enable_while_loop_double_buffering=false",
    "--xla_gpu_foo=1",
  ]
  with pytest.raises(ConfigError, match="not an XLA flag"):
    xla_options.xla_options(extra_flags=["-O3"])
  # In this (pytest) process the backend exists already: applying now would be silently ignored.
  import jax

  jax.devices()
  with pytest.raises(ConfigError, match="already initialised"):
    xla_options.apply(["--xla_dump_to=/tmp/x"])
