"""How each HumanEval-X language is compiled and run: one driver per language.

A driver knows its toolchain (whether it is installed, a fingerprint for the result cache, the host
paths the sandbox must expose), the program's file name, and the compile / run commands. Toolchain
state shared across samples lives in the toolchain directory (default `~/.cache/geex-jax`, or
$GEEX_EVAL_CACHE; `scripts/install_toolchains.sh` uses the same place):
  node/node_modules/js-md5   npm package for JavaScript/162
  go-build/                  the Go build cache shared by all Go compiles (testify compiled once)
  rust/<fingerprint>/        rand (0.4 API shim over Debian's rand 0.8), regex and md5, compiled
                             once with cargo from /usr/share/cargo/registry, offline; each sample is
                             then a single `rustc --test` against these rlibs.
  cpp/<tag>/                 the C++ standard-include header and its precompiled .gch
  java/<tag>/javac.jsa       a class-data-sharing archive of javac's classes
  results/                   the verdict cache (the CLI's default --cache-dir)
Everything here is built by the evaluator on first use (under a file lock) except js-md5.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Optional

from geex_jax import fileio
from geex_jax.humaneval_x.sandbox import Limits

GOPATH = "/usr/share/gocode"
CARGO_REGISTRY = "/usr/share/cargo/registry"
GIB = 1 << 30

# JVM start-up flags: client compiler only, serial GC, class-data sharing, no perf file: the
# programs are tiny, so start-up dominates.
JVM_FLAGS = [
  "-XX:TieredStopAtLevel=1",
  "-XX:+UseSerialGC",
  "-Xshare:auto",
  "-XX:-UsePerfData",
  "-Xmx1g",
]


def default_toolchain_dir() -> pathlib.Path:
  env = os.environ.get("GEEX_EVAL_CACHE")
  if env:
    return pathlib.Path(env)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "geex-jax"


def _version(argv: list[str]) -> str:
  try:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    return (out.stdout + out.stderr).strip().splitlines()[0] if out.returncode == 0 else ""
  except (OSError, subprocess.TimeoutExpired, IndexError):
    return ""


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  """An exclusive file lock (several evaluator processes may prepare the same cache)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


class ToolchainError(RuntimeError):
  """A toolchain is present but could not be prepared (e.g. the Rust crates do not build)."""


@dataclasses.dataclass
class Driver:
  """Compile/run recipe of one language. Subclasses fill in the details."""

  toolchain_dir: pathlib.Path
  key: str = ""
  filename: str = ""
  compiled: bool = True
  run_limits: Limits = Limits(timeout_s=10)
  compile_limits: Limits = Limits(
    timeout_s=60,
    cpu_s=120,
    data_bytes=4 * GIB,
    nproc=4096,
    fsize_bytes=512 << 20,
    tmpfs_bytes=256 << 20,
  )

  def missing(self) -> Optional[str]:
    """None when the toolchain is installed, else what is missing (a skip reason)."""
    raise NotImplementedError

  def fingerprint(self) -> str:
    """Identifies the toolchain in the result cache key."""
    raise NotImplementedError

  def prepare(self) -> None:
    """One-time work before the first program (build shared caches)."""

  def ro_paths(self) -> list[str]:
    """Host paths the sandbox must expose read-only (interpreters, prebuilt libraries)."""
    return []

  def compile_rw_paths(self) -> list[str]:
    return []

  def compile_argv(self, source: str) -> list[str]:
    return []

  def file_text(self, source: str) -> str:
    """What goes into `filename` for a program (a driver may move a fixed prefix elsewhere)."""
    return source

  def compile_env(self) -> dict[str, str]:
    return {}

  def run_argv(self) -> list[str]:
    raise NotImplementedError

  def run_env(self) -> dict[str, str]:
    return {}

  def passed(self, returncode: int, stdout_bytes: int, stderr_bytes: int) -> bool:
    return returncode == 0


def _which_all(*names: str) -> Optional[str]:
  missing = [n for n in names if not shutil.which(n)]
  return ", ".join(missing) + " not installed" if missing else None


@dataclasses.dataclass
class PythonDriver(Driver):
  key: str = "python"
  filename: str = "main.py"
  compiled: bool = False

  @functools.cached_property
  def _interp(self) -> tuple[str, str, Optional[str]]:
    """(interpreter, its installation prefix, directory holding numpy) of this Python."""
    spec = importlib.util.find_spec("numpy")
    site = str(pathlib.Path(spec.origin).parent.parent) if spec and spec.origin else None
    return os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix), site

  def missing(self):
    return None if self._interp[2] else "numpy is not importable (the test header imports it)"

  def fingerprint(self):
    import numpy

    return f"{sys.version} numpy {numpy.__version__}"

  def ro_paths(self):
    _, prefix, site = self._interp
    return [prefix, site]

  def run_argv(self):
    return [self._interp[0], "-B", "-s", self.filename]

  def run_env(self):
    # One BLAS thread: each thread counts against the process limit and reserves memory.
    return {
      "PYTHONPATH": self._interp[2],
      "PYTHONHASHSEED": "0",
      "OPENBLAS_NUM_THREADS": "1",
      "OMP_NUM_THREADS": "1",
      "MKL_NUM_THREADS": "1",
    }


@dataclasses.dataclass
class CppDriver(Driver):
  key: str = "cpp"
  filename: str = "main.cpp"

  def missing(self):
    if m := _which_all("g++"):
      return m
    if not os.path.exists("/usr/include/boost/version.hpp"):
      return "Boost headers (libboost-dev) not installed"
    if not os.path.exists("/usr/include/openssl/ssl.h"):
      return "OpenSSL headers (libssl-dev) not installed"
    return None

  def fingerprint(self):
    return _version(["g++", "--version"])

  @functools.cached_property
  def prelude(self) -> pathlib.Path:
    """assembly.CPP_HEADER as a header with a precompiled .gch beside it (4x less compile CPU:
    the standard headers are parsed once, not per program)."""
    from geex_jax.humaneval_x.assembly import CPP_HEADER

    tag = hashlib.sha256((self.fingerprint() + CPP_HEADER).encode()).hexdigest()[:16]
    return self.toolchain_dir / "cpp" / tag / "geex_prelude.h"

  def prepare(self):
    from geex_jax.humaneval_x.assembly import CPP_HEADER

    gch = self.prelude.with_suffix(".h.gch")
    if gch.is_file():
      return
    with _locked(self.prelude.parent.with_suffix(".lock")):
      if gch.is_file():
        return
      self.prelude.parent.mkdir(parents=True, exist_ok=True)
      self.prelude.write_text(CPP_HEADER)
      with fileio.atomic_path(gch) as tmp:
        # Same language flags as the programs, or g++ ignores the .gch (and parses the header).
        out = subprocess.run(
          ["g++", *self.STD, "-x", "c++-header", str(self.prelude), "-o", tmp],
          capture_output=True,
          text=True,
          timeout=600,
        )
        if out.returncode != 0 and os.path.exists(tmp):
          os.unlink(tmp)  # without a .gch g++ parses the header each time: slower, same result

  STD = ("-std=c++11",)

  def _with_prelude(self, source: str) -> bool:
    from geex_jax.humaneval_x.assembly import CPP_HEADER

    return source.startswith(CPP_HEADER) and self.prelude.with_suffix(".h.gch").is_file()

  def file_text(self, source):
    from geex_jax.humaneval_x.assembly import CPP_HEADER

    # `-include prelude.h` is the header as the program's first line: same program, but the
    # precompiled form is used.
    return source[len(CPP_HEADER) :] if self._with_prelude(source) else source

  def ro_paths(self):
    return [str(self.prelude.parent)]

  def compile_argv(self, source):
    libs = ["-lcrypto", "-lssl"] if "openssl" in source else []
    pre = ["-include", str(self.prelude)] if self._with_prelude(source) else []
    return ["g++", *self.STD, "-pipe", *pre, "-o", "main", self.filename, *libs]

  def run_argv(self):
    return ["./main"]


@dataclasses.dataclass
class JavaDriver(Driver):
  key: str = "java"
  filename: str = "Main.java"

  def missing(self):
    return _which_all("javac", "java")

  @functools.cached_property
  def _fingerprint(self) -> str:
    return _version(["javac", "-version"]) + " " + _version(["java", "-version"])

  def fingerprint(self):
    return self._fingerprint

  @property
  def javac_archive(self) -> pathlib.Path:
    """A class-data-sharing archive of javac's own classes: javac starts ~25% faster with it."""
    tag = hashlib.sha256(self._fingerprint.encode()).hexdigest()[:16]
    return self.toolchain_dir / "java" / tag / "javac.jsa"

  def prepare(self):
    jsa = self.javac_archive
    if jsa.is_file():
      return
    with _locked(jsa.parent.with_suffix(".lock")):
      if jsa.is_file():
        return
      jsa.parent.mkdir(parents=True, exist_ok=True)
      (jsa.parent / "Hello.java").write_text(
        "import java.util.*;\nclass Hello { public static void main(String[] a) {\n"
        "  List<Integer> l = new ArrayList<>(Arrays.asList(3, 1, 2)); Collections.sort(l);\n"
        "  System.out.println(l); } }\n"
      )
      # No archive written: jsa stays absent; javac still works without it, only slower.
      with fileio.atomic_path(jsa) as tmp:
        subprocess.run(
          [
            "javac",
            *("-J" + f for f in JVM_FLAGS if f != "-Xshare:auto"),
            f"-J-XX:ArchiveClassesAtExit={tmp}",
            "-d",
            str(jsa.parent),
            str(jsa.parent / "Hello.java"),
          ],
          capture_output=True,
          timeout=600,
        )

  def ro_paths(self):
    return [str(self.javac_archive.parent)]

  def compile_argv(self, source):
    flags = list(JVM_FLAGS)
    if self.javac_archive.is_file():
      flags.append(f"-XX:SharedArchiveFile={self.javac_archive}")
    return [
      "javac",
      *("-J" + f for f in flags),
      "-encoding",
      "UTF-8",
      "-nowarn",
      "-d",
      ".",
      self.filename,
    ]

  def run_argv(self):
    return ["java", *JVM_FLAGS, "-cp", ".", "Main"]


@dataclasses.dataclass
class JsDriver(Driver):
  key: str = "js"
  filename: str = "main.js"
  compiled: bool = False

  @property
  def node_modules(self) -> pathlib.Path:
    return self.toolchain_dir / "node" / "node_modules"

  def missing(self):
    if m := _which_all("node"):
      return m
    if not (self.node_modules / "js-md5" / "package.json").is_file():
      return f"npm package js-md5 not installed in {self.node_modules}"
    return None

  def fingerprint(self):
    pkg = json.loads((self.node_modules / "js-md5" / "package.json").read_text())
    return _version(["node", "--version"]) + " js-md5 " + pkg.get("version", "?")

  def ro_paths(self):
    return [str(self.node_modules)]

  def run_argv(self):
    return ["node", self.filename]

  def run_env(self):
    return {"NODE_PATH": str(self.node_modules)}

  def passed(self, returncode, stdout_bytes, stderr_bytes):
    # console.assert only prints: a pass is a clean exit with nothing printed.
    return returncode == 0 and stdout_bytes == 0 and stderr_bytes == 0


@dataclasses.dataclass
class GoDriver(Driver):
  key: str = "go"
  filename: str = "main_test.go"

  @property
  def cache(self) -> pathlib.Path:
    return self.toolchain_dir / "go-build"

  def missing(self):
    if m := _which_all("go"):
      return m
    if not os.path.isdir(f"{GOPATH}/src/github.com/stretchr/testify"):
      return "testify (golang-github-stretchr-testify-dev) not installed"
    return None

  def fingerprint(self):
    return _version(["go", "version"])

  def prepare(self):
    # Shared by every compile uid: world-writable (it is only reachable from the sandboxes
    # when the toolchain dir itself is private).
    self.cache.mkdir(parents=True, exist_ok=True)
    os.chmod(self.cache, 0o777)

  def compile_rw_paths(self):
    return [str(self.cache)]

  def compile_env(self):
    return {
      "GOPATH": GOPATH,
      "GO111MODULE": "off",
      "GOFLAGS": "",
      "GOCACHE": str(self.cache),
      "CGO_ENABLED": "0",
      "GOTOOLCHAIN": "local",
      "GOTELEMETRY": "off",
    }

  def compile_argv(self, source):
    # vet is off: a vet complaint is not a wrong answer, and it doubles the compile time.
    # No symbol table / DWARF in the test binary: links ~30% faster, panics still show lines.
    return ["go", "test", "-c", "-vet=off", "-ldflags=-s -w", "-o", "main.test", self.filename]

  def run_argv(self):
    return ["./main.test", "-test.count=1"]


# rand 0.4's API (gen_range(low, high), gen(), thread_rng(), random()) over Debian's rand 0.8:
# the dataset's Rust tests and declarations were written against rand 0.4.
RAND_SHIM = r'''//! rand 0.4-compatible front for rand 0.8 (HumanEval-X Rust tests use the 0.4 API).
pub use rand08::{distributions, random, rngs, seq, CryptoRng, Error, RngCore, SeedableRng};
use rand08::distributions::uniform::SampleUniform;
use rand08::distributions::{Distribution, Standard};

pub trait Rng: RngCore {
    fn gen<T>(&mut self) -> T where Standard: Distribution<T> { rand08::Rng::gen(self) }
    fn gen_range<T: SampleUniform + PartialOrd>(&mut self, low: T, high: T) -> T {
        rand08::Rng::gen_range(self, low..high)
    }
    fn gen_bool(&mut self, p: f64) -> bool { rand08::Rng::gen_bool(self, p) }
    fn gen_weighted_bool(&mut self, n: u32) -> bool {
        n <= 1 || rand08::Rng::gen_range(self, 0..n) == 0
    }
    fn shuffle<T>(&mut self, values: &mut [T]) { rand08::seq::SliceRandom::shuffle(values, self) }
    fn choose<'a, T>(&mut self, values: &'a [T]) -> Option<&'a T> {
        rand08::seq::SliceRandom::choose(values, self)
    }
}
impl<R: RngCore + ?Sized> Rng for R {}

pub fn thread_rng() -> rngs::ThreadRng { rand08::thread_rng() }

pub mod prelude {
    pub use super::{random, thread_rng, Rng, RngCore, SeedableRng};
}
'''


SHIM_MANIFEST = (
  '[package]\nname = "rand"\nversion = "0.4.6"\nedition = "2021"\n\n'
  '[dependencies]\nrand08 = { package = "rand", version = "0.8" }\n'
)
DEPS_MANIFEST = (
  '[package]\nname = "geexdeps"\nversion = "0.1.0"\nedition = "2021"\n\n[dependencies]\n'
  'rand = { path = "../shim" }\nmd5 = "0.7"\n'
  # Debian packages regex without its optional perf-literal crates (aho-corasick, memchr).
  'regex = { version = "1", default-features = false, features = ["std", "unicode", '
  '"perf-cache", "perf-dfa", "perf-inline"] }\n'
)


@dataclasses.dataclass
class RustDriver(Driver):
  key: str = "rust"
  filename: str = "main.rs"
  crates = ("rand", "regex", "md5")

  @functools.cached_property
  def sysroot(self) -> Optional[str]:
    rustc = shutil.which("rustc") or os.path.expanduser("~/.cargo/bin/rustc")
    if not os.path.exists(rustc):
      return None
    try:
      out = subprocess.run(
        [rustc, "--print", "sysroot"], capture_output=True, text=True, timeout=60
      )
    except (OSError, subprocess.TimeoutExpired):
      return None
    return out.stdout.strip() if out.returncode == 0 else None

  @property
  def rustc(self) -> str:
    # The toolchain's own binary, not rustup's proxy (which needs ~/.rustup state).
    return os.path.join(self.sysroot or "/usr", "bin", "rustc")

  @property
  def cargo(self) -> Optional[str]:
    own = os.path.join(self.sysroot or "/usr", "bin", "cargo")
    return own if os.path.exists(own) else shutil.which("cargo")

  def missing(self):
    if not self.sysroot or not os.path.exists(self.rustc):
      return "rustc not installed"
    if not self.cargo:
      return "cargo not installed"
    for crate in self.crates:
      if not list(pathlib.Path(CARGO_REGISTRY).glob(f"{crate}-[0-9]*")):
        return f"Rust crate {crate} (librust-{crate}-dev) not installed in {CARGO_REGISTRY}"
    return None

  @functools.cached_property
  def _fingerprint(self) -> str:
    crates = sorted(p.name for p in pathlib.Path(CARGO_REGISTRY).glob("*-[0-9]*"))
    text = (
      _version([self.rustc, "-vV"])
      + " "
      + " ".join(crates)
      + RAND_SHIM
      + SHIM_MANIFEST
      + DEPS_MANIFEST
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]

  def fingerprint(self):
    return self._fingerprint

  @property
  def deps_root(self) -> pathlib.Path:
    return self.toolchain_dir / "rust" / self._fingerprint

  @functools.cached_property
  def externs(self) -> dict[str, str]:
    return json.loads((self.deps_root / "externs.json").read_text())

  def prepare(self):
    """Builds the crates once into deps_root (locked; reused while the toolchain is unchanged)."""
    root = self.deps_root
    if (root / "externs.json").is_file():
      return
    with _locked(root.parent / f"{root.name}.lock"):
      if (root / "externs.json").is_file():
        return
      shutil.rmtree(root, ignore_errors=True)
      (root / "shim" / "src").mkdir(parents=True)
      (root / "deps" / "src").mkdir(parents=True)
      (root / "deps" / ".cargo").mkdir()
      (root / "shim" / "Cargo.toml").write_text(SHIM_MANIFEST)
      (root / "shim" / "src" / "lib.rs").write_text(RAND_SHIM)
      (root / "deps" / "Cargo.toml").write_text(DEPS_MANIFEST)
      (root / "deps" / "src" / "lib.rs").write_text("")
      (root / "deps" / ".cargo" / "config.toml").write_text(
        '[source.crates-io]\nreplace-with = "debian"\n\n[source.debian]\n'
        f'directory = "{CARGO_REGISTRY}"\n\n[net]\noffline = true\n'
      )
      env = {
        **os.environ,
        "CARGO_HOME": str(root / "cargo-home"),
        "RUSTC": self.rustc,
        "CARGO_TARGET_DIR": str(root / "target"),
      }
      env.pop("RUSTFLAGS", None)
      out = subprocess.run(
        [self.cargo, "build", "--offline", "--message-format=json"],
        cwd=root / "deps",
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
      )
      if out.returncode != 0:
        raise ToolchainError("building the Rust crates failed: " + out.stderr.strip()[-2000:])
      externs: dict[str, str] = {}
      for line in out.stdout.splitlines():
        try:
          msg = json.loads(line)
        except json.JSONDecodeError:
          continue
        if msg.get("reason") != "compiler-artifact":
          continue
        name = msg["target"]["name"]
        # Our shim is the path dependency named rand; Debian's rand 0.8 stays a transitive dep.
        is_shim = name == "rand" and "shim" in msg.get("manifest_path", "")
        if name in ("regex", "md5") or is_shim:
          rlibs = [f for f in msg["filenames"] if f.endswith(".rlib")]
          if rlibs:
            externs[name] = rlibs[0]
      if set(externs) != set(self.crates):
        raise ToolchainError(f"Rust crates built but not found: {sorted(externs)}")
      externs["_deps"] = str(root / "target" / "debug" / "deps")
      fileio.write_atomic(root / "externs.json", json.dumps(externs, indent=1))

  def ro_paths(self):
    return [self.sysroot, str(self.deps_root)]

  def compile_argv(self, source):
    ex = self.externs
    argv = [
      self.rustc,
      "--edition",
      "2021",
      "--test",
      "-C",
      "debuginfo=0",
      "--cap-lints",
      "allow",
      "-o",
      "main",
      self.filename,
      "-L",
      f"dependency={ex['_deps']}",
    ]
    for crate in self.crates:
      argv += ["--extern", f"{crate}={ex[crate]}"]
    return argv

  def run_argv(self):
    return ["./main", "--test-threads=1", "-q"]


DRIVERS = {d.key: d for d in (PythonDriver, CppDriver, JavaDriver, JsDriver, GoDriver, RustDriver)}


def make_driver(
  key: str,
  toolchain_dir: pathlib.Path,
  run_timeout_s: float,
  compile_timeout_s: float,
  memory_bytes: Optional[int] = None,
) -> Driver:
  """The driver of HumanEval-X language `key` with the given timeouts (and run memory limit)."""
  cls = DRIVERS[key]
  d = cls(toolchain_dir=pathlib.Path(toolchain_dir))
  d.run_limits = dataclasses.replace(
    d.run_limits,
    timeout_s=run_timeout_s,
    cpu_s=int(run_timeout_s * 2) + 5,
    data_bytes=memory_bytes or d.run_limits.data_bytes,
  )
  d.compile_limits = dataclasses.replace(
    d.compile_limits, timeout_s=compile_timeout_s, cpu_s=int(compile_timeout_s * 2) + 5
  )
  return d
