"""geex_jax/humaneval_x/toolchains.py and scripts/install_toolchains.sh."""

import os
import pathlib
import subprocess
import time

import pytest

from geex_jax.humaneval_x import toolchains
import humaneval_testing as testing
from geex_jax.humaneval_x.assembly import Assembled
from geex_jax.humaneval_x.executor import Executor

REPO = pathlib.Path(__file__).resolve().parents[2]


def _install():
  start = time.monotonic()
  out = subprocess.run(
    ["bash", str(REPO / "scripts" / "install_toolchains.sh")],
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert out.returncode == 0, out.stderr  # never breaks `make test`
  return out.stdout, time.monotonic() - start


def test_install_script_is_idempotent_and_quick_when_done():
  first, _ = _install()
  if "all HumanEval-X toolchains present" not in first:
    assert "missing (needs root and apt-get)" in first or "installing" in first
  second, seconds = _install()
  if "all HumanEval-X toolchains present" not in second:
    msg = f"toolchains still missing after the install script: {second.strip()}"
    if os.environ.get("GEEX_REQUIRE_TOOLCHAINS") == "1":
      pytest.fail(msg)
    pytest.skip(msg)
  assert seconds < 5  # everything present: no apt-get update, no npm


@pytest.fixture(scope="module")
def ex():
  e = Executor(workers=2)
  testing.require(e, ["rust", "go", "cpp"])
  return e


RUST_API = """
use rand::Rng;
use regex::Regex;
fn main() {}
#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn crates() {
        let mut rng = rand::thread_rng();
        let x: i32 = rng.gen_range(0, 4);          // rand 0.4's two-argument form
        assert!((0..4).contains(&x));
        let _y: i32 = rng.gen();
        assert!(rand::random::<u32>() % 26 < 26);
        assert!(Regex::new(r"^a+b$").unwrap().is_match("aaab"));
        assert_eq!(format!("{:x}", md5::compute(b"")), "d41d8cd98f00b204e9800998ecf8427e");
    }
}
"""


def test_rust_crates_prebuilt_once_with_rand_04_api(ex):
  d = ex.drivers["rust"]
  assert set(d.externs) == {"rand", "regex", "md5", "_deps"}
  assert all(pathlib.Path(p).exists() for p in d.externs.values())
  argv = d.compile_argv("")
  assert argv[0].endswith("/bin/rustc") and "--test" in argv  # one rustc per program, no cargo
  v = ex.execute([Assembled("rust", "rand-api", RUST_API, "")], progress=False)[0]
  assert v.passed, v.text
  wrong = RUST_API.replace('"d41d8', '"00000')
  v = ex.execute([Assembled("rust", "rand-api", wrong, "")], progress=False)[0]
  assert v.status == "failed" and "assert" in v.reason


def test_go_and_cpp_use_shared_caches(ex):
  go = ex.drivers["go"]
  assert go.compile_env()["GOCACHE"] == str(go.cache) and go.cache.is_dir()
  assert go.compile_env()["GOPATH"] == toolchains.GOPATH
  cpp = ex.drivers["cpp"]
  assert cpp.prelude.with_suffix(".h.gch").is_file()
  from geex_jax.humaneval_x.assembly import CPP_HEADER

  src = (
    CPP_HEADER + "int main() { vector<int> v{3, 1, 2}; sort(v.begin(), v.end());\n"
    "  return v[0] == 1 ? 0 : 1; }\n"
  )
  assert cpp.file_text(src).startswith("int main()")
  assert "-include" in cpp.compile_argv(src)
  assert ex.execute([Assembled("cpp", "pch", src, "")], progress=False)[0].passed


def test_limits_follow_the_flags(tmp_path):
  d = toolchains.make_driver(
    "java", tmp_path, run_timeout_s=4, compile_timeout_s=30, memory_bytes=512 << 20
  )
  assert d.run_limits.timeout_s == 4 and d.run_limits.data_bytes == 512 << 20
  assert d.compile_limits.timeout_s == 30 and d.run_limits.cpu_s >= 4
