"""Packaging: pyproject.toml declares exactly what the code imports, and a non-editable
`pip install .` gives console scripts that find their gin configs."""

import ast
import importlib.metadata
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ("geex_jax", "conversion")


def _requirement_name(req: str) -> str:
  return re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0].lower().replace("_", "-")


def imported_distributions() -> dict[str, set[str]]:
  """{distribution: {modules importing it}} of every third-party import in the package."""
  to_dist = importlib.metadata.packages_distributions()
  stdlib = sys.stdlib_module_names
  found: dict[str, set[str]] = {}
  for d in PACKAGE_DIRS:
    for path in (REPO / d).rglob("*.py"):
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
          names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
          names = [node.module]
        else:
          continue
        for name in names:
          top = name.split(".")[0]
          if top in stdlib or top in PACKAGE_DIRS or top == "__future__":
            continue
          for dist in to_dist.get(top, [top]):
            found.setdefault(dist.lower().replace("_", "-"), set()).add(str(path.relative_to(REPO)))
  return found


def test_dependencies_are_what_the_code_imports():
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  declared = {_requirement_name(r) for r in project["dependencies"]}
  optional = {
    _requirement_name(r) for reqs in project["optional-dependencies"].values() for r in reqs
  }
  used = imported_distributions()
  # Test support that ships in the library (moves out with the redesign, issue 14).
  used.pop("pytest", None)
  missing = {d: sorted(m)[:3] for d, m in used.items() if d not in declared | optional}
  assert not missing, f"imported but not declared in pyproject.toml: {missing}"
  unused = (declared | optional) - set(used)
  # Declared for what they bring at run time rather than by import name.
  unused -= {"tensorflow-text", "importlib-resources"}
  # The `test` extra is what the tests import, not the package.
  unused -= {_requirement_name(r) for r in project["optional-dependencies"].get("test", [])}
  assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"


@pytest.mark.slow
def test_non_editable_install_finds_its_gin_configs(tmp_path):
  wheels, target = tmp_path / "wheels", tmp_path / "site"
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  subprocess.run(
    [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, REPO],
    check=True,
    capture_output=True,
    cwd=tmp_path,
  )
  wheel = next(wheels.glob("geex_jax-*.whl"))
  subprocess.run(
    [*pip, "install", "--no-deps", "--target", target, wheel], check=True, capture_output=True
  )
  env = {**os.environ, "PYTHONPATH": str(target)}
  # The installed copy is the one imported (not the checkout), from a folder outside the repo.
  where = subprocess.run(
    [sys.executable, "-c", "import geex_jax; print(geex_jax.__file__)"],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    check=True,
  )
  assert where.stdout.startswith(str(target))
  run = tmp_path / "run"
  r = subprocess.run(
    [
      str(target / "bin" / "geex-train"),
      "--gin_file=models/tiny.gin",
      "--gin_file=runs/pretrain.gin",
      f"--gin.MODEL_DIR='{run}'",
      "--gin.CORPUS_DIR=None",
      "--gin.train.data_source=@synthetic_batches",
      "--gin.synthetic_batches.vocab_size=512",
      "--gin.VOCAB_SIZE=512",
      "--gin.BATCH_SIZE=8",
      "--gin.SEQUENCE_LENGTH=16",
      "--gin.TRAIN_STEPS=1",
      "--gin.train.progress=False",
      "--gin.train.tensorboard=False",
    ],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert (run / "config.json").exists()
  # conversion/ installs as geex_jax.conversion: no top-level `conversion` module in site-packages.
  assert not (target / "conversion").exists()
  probe = subprocess.run(
    [
      sys.executable,
      "-c",
      "import geex_jax.conversion.convert, geex_jax.training.cli\nimport conversion",
    ],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
  )
  assert probe.returncode == 1 and "No module named 'conversion'" in probe.stderr, probe.stderr
  helped = subprocess.run(
    [str(target / "bin" / "geex-convert"), "--help"],
    env=env,
    cwd=tmp_path,
    capture_output=True,
    text=True,
  )
  assert helped.returncode == 0 and "torch-to-jax" in helped.stdout, helped.stderr
