"""geex_jax/data/cli.py: `geex-data build` prints a summary; bad input is one line, exit code 2."""

import pytest

from data_fixtures import code_file, write_tree
from geex_jax.data import cli, corpus


def test_build_prints_summary(tmp_path, capsys):
  write_tree(tmp_path / "src", {f"f{i}.py": code_file("py", i) for i in range(3)})
  cli.main(
    ["build", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-progress"]
  )
  out = capsys.readouterr().out
  assert "kept 3 of 3 source files" in out and "Python 3" in out


def test_build_heldout_fraction(tmp_path, capsys):
  write_tree(tmp_path / "src", {f"f{i}.py": code_file("py", i) for i in range(12)})
  argv = ["build", "--src", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-progress"]
  cli.main([*argv, "--heldout-fraction", "0.5"])
  m = corpus.load_manifest(str(tmp_path / "out"))
  held = m["validation_documents"]
  assert 0 < held < 12 and m["options"]["heldout_fraction"] == 0.5
  assert m["languages"]["Python"]["validation_documents"] == held
  assert f"{held} held out for validation" in capsys.readouterr().out


@pytest.mark.parametrize(
  "argv,message",
  [
    (["build", "--src", "/nonexistent-dir", "--out", "OUT"], "does not exist"),
    (["build", "--embedded", "--src", "x", "--out", "OUT"], "--embedded takes no --src"),
    (["build", "--src", ".", "--out", "OUT", "--languages", "klingon"], "unknown language"),
    (["build", "--src", ".", "--out", "OUT", "--heldout-fraction", "2"], "not in [0, 1)"),
    (["build", "--src", ".", "--out", "OUT", "--", "--project=p"], "given without --runner"),
    (["build", "--embedded", "--out", "OUT", "--runner", "DirectRunner"], "drop --runner"),
  ],
)
def test_errors_are_one_line_exit_2(tmp_path, capsys, argv, message):
  argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("geex-data: error:") and message in err and "\n" not in err
