"""Journey: the TPU VM scripts (tpu_scripts/*.sh) end to end against a fake `gcloud`.

The fake gcloud runs `ssh --command=CMD` the way sshd does, with `bash -c CMD`, once per fake worker
(each with its own HOME), and logs every invocation. The workers' sudo/python3.11/pip are fakes, so
install.sh runs for real but cheaply; the venv's `python` is a fake trainer that records its argv,
writes "got SIGTERM" and exits 143 on SIGTERM, and otherwise sleeps (at most 60 s).
slurm_gpu.sbatch is checked the same way with fake `srun` and `scontrol`.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "tpu_scripts"
WORKERS = 2
TIMEOUT = 60  # seconds, for any one script

FAKE_GCLOUD = r'''#!{python}
"""Fake gcloud: `config get-value project` and `compute tpus tpu-vm VERB ...`."""
import json, os, pathlib, shutil, subprocess, sys

ROOT = pathlib.Path({root!r})
WORKERS = {workers}
args = sys.argv[1:]
with open(ROOT / "gcloud.calls", "a") as f:
  f.write(json.dumps(args) + "\n")
if args == ["config", "get-value", "project"]:
  print("fake-project")
  sys.exit(0)
if args[:3] != ["compute", "tpus", "tpu-vm"] or len(args) < 5:
  sys.exit(f"fake gcloud: unsupported command {{args}}")
verb, rest = args[3], args[4:]
flags = dict(a[2:].split("=", 1) for a in rest if a.startswith("--") and "=" in a)
switches = {{a[2:] for a in rest if a.startswith("--") and "=" not in a}}
positional = [a for a in rest if not a.startswith("--")]
if flags.get("project") != "fake-project" or flags.get("zone") != "fake-zone1-a":
  sys.exit(f"fake gcloud: wrong --project/--zone in {{args}}")
state = ROOT / "tpu.json"
home = lambda i: ROOT / f"worker{{i}}"


def exists(name):
  if not state.exists() or json.loads(state.read_text())["name"] != name:
    sys.exit(f"ERROR: (gcloud) TPU {{name}} not found")


if verb == "create":
  (name,) = positional
  if state.exists():
    sys.exit(f"ERROR: (gcloud) TPU {{name}} already exists")
  state.write_text(json.dumps({{"name": name, "type": flags["accelerator-type"],
                                "version": flags["version"], "spot": "spot" in switches}}))
  for i in range(WORKERS):
    home(i).mkdir(exist_ok=True)
  print(f"Created TPU {{name}}", file=sys.stderr)
elif verb == "describe":
  (name,) = positional
  exists(name)
  print("READY\t" + json.loads(state.read_text())["type"])
elif verb == "delete":
  (name,) = positional
  exists(name)
  state.unlink()
  print(f"Deleted TPU {{name}}", file=sys.stderr)
elif verb == "scp":
  src, dst = positional
  name, path = dst.split(":", 1)
  exists(name)
  assert flags["worker"] == "all" and path.startswith("~/"), args
  for i in range(WORKERS):
    shutil.copy(src, home(i) / path[2:])
elif verb == "ssh":
  (name,) = positional
  exists(name)
  w = flags["worker"]
  procs = []
  for i in (range(WORKERS) if w == "all" else [int(w)]):
    env = dict(os.environ, HOME=str(home(i)), FAKE_WORKER=str(i),
               PATH=str(ROOT / "worker-bin") + os.pathsep + os.environ["PATH"])
    procs.append(subprocess.Popen(["bash", "-c", flags["command"]], cwd=home(i), env=env))
  sys.exit(max(p.wait() for p in procs))
else:
  sys.exit(f"fake gcloud: unsupported verb {{verb}}")
'''

# The trainer: the venv's `python` on the workers.
FAKE_PYTHON = r'''#!{python}
import json, os, signal, sys, time

home = os.environ["HOME"]
if sys.argv[1:2] == ["-c"]:  # install.sh's check
  # One write: the workers share stdout.
  sys.stdout.write(f"{{os.environ['FAKE_WORKER']}} 4 TPU v4 (fake)\n")
  sys.exit(0)
if sys.argv[1:3] != ["-m", "geex_jax.training"]:
  sys.exit(f"fake python: unexpected {{sys.argv}}")
with open(os.path.join(home, "trainer.calls"), "a") as f:
  f.write(json.dumps({{"pid": os.getpid(), "argv": sys.argv[1:]}}) + "\n")


def on_term(signum, frame):
  with open(os.path.join(home, "trainer.events"), "a") as f:
    f.write(f"{{os.getpid()}} got SIGTERM\n")
  print("got SIGTERM: checkpoint saved, exiting 143", flush=True)
  sys.exit(143)


signal.signal(signal.SIGTERM, on_term)
print(f"fake geex-train on worker {{os.environ['FAKE_WORKER']}}: step 1 loss 6.25", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
  time.sleep(0.1)
'''

WORKER_BIN = {
  "hostname": 'echo "worker-$FAKE_WORKER"\n',
  "sudo": 'echo "$*" >> "$HOME/sudo.calls"\n',
  # python3.11 -m venv DIR: a venv whose python is the fake trainer and whose pip logs its args.
  "python3.11": textwrap.dedent('''\
    [[ "$1 $2" == "-m venv" && -n "$3" ]] || { echo "fake python3.11: $*" >&2; exit 1; }
    mkdir -p "$3/bin" && venv=$(cd "$3" && pwd)
    cp "$FAKE_ROOT/fake-python" "$venv/bin/python"
    printf '#!/usr/bin/env bash\\necho "$*" >> "$HOME/pip.calls"\\n' > "$venv/bin/pip"
    chmod +x "$venv/bin/python" "$venv/bin/pip"
    printf 'VIRTUAL_ENV=%q\\nexport PATH="$VIRTUAL_ENV/bin:$PATH"\\n' "$venv" > "$venv/bin/activate"
    '''),
}


def _write_exe(path: pathlib.Path, text: str) -> None:
  path.write_text(text)
  path.chmod(0o755)


class Journey:
  """The fake cloud under tmp_path and a runner for the scripts."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    bin_dir = root / "bin"
    worker_bin = root / "worker-bin"
    bin_dir.mkdir()
    worker_bin.mkdir()
    _write_exe(
      bin_dir / "gcloud", FAKE_GCLOUD.format(python=sys.executable, root=str(root), workers=WORKERS)
    )
    _write_exe(root / "fake-python", FAKE_PYTHON.format(python=sys.executable))
    for name, body in WORKER_BIN.items():
      _write_exe(worker_bin / name, "#!/usr/bin/env bash\n" + body)
    self.env = {
      k: v
      for k, v in os.environ.items()
      if k
      not in (
        "PROJECT",
        "ZONE",
        "TPU_NAME",
        "ACCELERATOR_TYPE",
        "RUNTIME_VERSION",
        "REPO_URL",
        "REPO_REF",
        "REMOTE_DIR",
        "JAX_VERSION",
        "LOG_FILE",
        "PID_FILE",
        "SPOT",
        "WORKER",
        "STOP_TIMEOUT",
      )
    }
    self.env.update(
      PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
      FAKE_ROOT=str(root),
      ZONE="fake-zone1-a",
      TPU_NAME="geex-test",
      ACCELERATOR_TYPE="v4-16",
      STOP_TIMEOUT="20",
    )

  def home(self, i: int) -> pathlib.Path:
    return self.root / f"worker{i}"

  def run(self, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
      ["bash", str(SCRIPTS / script), *args],
      env=dict(self.env, **env),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,
    )
    try:
      out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      out, err = proc.communicate()
      pytest.fail(f"{script} {args} ran past {TIMEOUT}s\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

  def gcloud_calls(self) -> list[list[str]]:
    path = self.root / "gcloud.calls"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

  def trainer_calls(self, i: int) -> list[dict]:
    path = self.home(i) / "trainer.calls"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

  def trainers(self) -> list[int]:
    """Pids of the fake trainers ever started (all workers)."""
    return [c["pid"] for i in range(WORKERS) for c in self.trainer_calls(i)]

  def kill_leftovers(self) -> None:
    """SIGKILLs what the journey left running: every process whose command line holds this
    journey's directory (the fake trainers, `tail -F` of a log). Rescans for a second, for a
    trainer that was still being started."""
    marker = (str(self.root) + os.sep).encode()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
      for proc in pathlib.Path("/proc").glob("[0-9]*"):
        try:
          if marker in (proc / "cmdline").read_bytes() and int(proc.name) != os.getpid():
            os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
          pass
      time.sleep(0.1)


def _alive(pid: int, marker: str = "geex_jax.training") -> bool:
  """pid runs (not a zombie) and its command line holds `marker`."""
  try:
    return marker.encode() in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
  except OSError:
    return False


def _wait_for(condition, timeout: float = 10.0) -> bool:
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > deadline:
      return False
    time.sleep(0.05)
  return True


@pytest.fixture
def journey(tmp_path):
  j = Journey(tmp_path)
  try:
    yield j
  finally:
    j.kill_leftovers()


TRAIN_ARGS = [
  "--gin_file=models/tiny.gin",
  "--gin_file=runs/pretrain.gin",
  "--gin.MODEL_DIR='/tmp/a dir/geex'",
  "--gin.train.mesh_shape=(1, -1, 8)",
]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_tpu_scripts_journey(journey):
  j = journey
  expected_argv = ["-m", "geex_jax.training", "--distributed", *TRAIN_ARGS]

  # create.sh: accelerator type, runtime, zone, project, spot.
  r = j.run("create.sh", SPOT="1")
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == "READY\tv4-16"
  create = [c for c in j.gcloud_calls() if c[3:4] == ["create"]]
  assert create == [
    [
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      "geex-test",
      "--accelerator-type=v4-16",
      "--version=tpu-ubuntu2204-base",
      "--spot",
      "--project=fake-project",
      "--zone=fake-zone1-a",
    ]
  ]

  # install.sh: this checkout, a venv and the pinned deps on every worker.
  r = j.run("install.sh")
  assert r.returncode == 0, r.stderr
  for i in range(WORKERS):
    code = j.home(i) / "geex-jax"
    assert (code / "pyproject.toml").read_bytes() == (REPO / "pyproject.toml").read_bytes()
    assert (code / "tpu_scripts" / "launch.sh").is_file()
    assert (code / ".venv" / "bin" / "activate").is_file()
    sudo = (j.home(i) / "sudo.calls").read_text()
    assert "apt-get -qq install -y python3.11 python3.11-venv" in sudo
    pip = (j.home(i) / "pip.calls").read_text()
    assert "-q -c requirements.txt -e . tensorboardX jax[tpu]==0.10.2" in pip
    assert f"{i} 4 TPU v4 (fake)" in r.stdout

  # launch.sh: one trainer per worker, with --distributed and exactly the given args.
  r = j.run("launch.sh", *TRAIN_ARGS)
  assert r.returncode == 0, r.stdout + r.stderr
  first = []
  for i in range(WORKERS):
    assert _wait_for(lambda: j.trainer_calls(i))  # the trainer records its argv once it runs
    (call,) = j.trainer_calls(i)
    assert call["argv"] == expected_argv
    assert _alive(call["pid"])
    assert (j.home(i) / "geex-train.pid").read_text().strip() == str(call["pid"])
    assert f"worker-{i}: started pid {call['pid']}" in r.stdout
    first.append(call["pid"])

  # A second launch refuses on every worker and starts nothing.
  r = j.run("launch.sh", *TRAIN_ARGS)
  assert r.returncode != 0
  time.sleep(1)  # time for a wrongly started trainer to show up
  for i in range(WORKERS):
    assert f"worker-{i}: already training, pid {first[i]}" in r.stderr
    assert len(j.trainer_calls(i)) == 1
    assert (j.home(i) / "geex-train.pid").read_text().strip() == str(first[i])
    assert _alive(first[i])

  # logs.sh streams worker 0's log, and keeps following it.
  proc = subprocess.Popen(
    ["bash", str(SCRIPTS / "logs.sh")],
    env=j.env,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
    start_new_session=True,
  )
  lines = []

  def pump():
    for line in proc.stdout:
      lines.append(line)

  threading.Thread(target=pump, daemon=True).start()
  try:
    deadline = time.monotonic() + TIMEOUT
    while not any("step 1" in line for line in lines) and time.monotonic() < deadline:
      time.sleep(0.05)
    assert lines == ["fake geex-train on worker 0: step 1 loss 6.25\n"]
    assert proc.poll() is None  # still following
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

  # stop.sh: SIGTERM to every trainer, waits for them to exit.
  r = j.run("stop.sh")
  assert r.returncode == 0, r.stdout + r.stderr
  for i in range(WORKERS):
    assert not _alive(first[i])
    assert (j.home(i) / "trainer.events").read_text() == f"{first[i]} got SIGTERM\n"
    assert "exiting 143" in (j.home(i) / "geex-train.log").read_text()
    assert f"worker-{i}: stopped" in r.stdout
  r = j.run("stop.sh")
  assert r.returncode == 0 and all(f"worker-{i}: not training" in r.stdout for i in range(WORKERS))

  # After stop, launch works again (a resume in real life).
  r = j.run("launch.sh", *TRAIN_ARGS)
  assert r.returncode == 0, r.stdout + r.stderr
  for i in range(WORKERS):
    assert _wait_for(lambda: len(j.trainer_calls(i)) == 2)
    calls = j.trainer_calls(i)
    assert len(calls) == 2 and calls[1]["argv"] == expected_argv and _alive(calls[1]["pid"])
  r = j.run("stop.sh")
  assert r.returncode == 0, r.stdout + r.stderr
  assert not any(_alive(pid) for pid in j.trainers())

  # teardown.sh deletes the slice.
  r = j.run("teardown.sh")
  assert r.returncode == 0, r.stderr
  assert j.gcloud_calls()[-1] == [
    "compute",
    "tpus",
    "tpu-vm",
    "delete",
    "geex-test",
    "--quiet",
    "--project=fake-project",
    "--zone=fake-zone1-a",
  ]
  assert not (j.root / "tpu.json").exists()


# --- slurm_gpu.sbatch: requeue when geex-train exits 143 -----------------------------------------

FAKE_SRUN = '''#!/usr/bin/env bash
echo "$*" > "$FAKE_ROOT/srun.args"
if [[ $FAKE_SRUN_RC == wait ]]; then  # run until SIGTERM, then "save" and exit 143
  trap 'echo got SIGTERM >> "$FAKE_ROOT/srun.args"; exit 143' TERM
  touch "$FAKE_ROOT/srun.started"
  for _ in $(seq 300); do sleep 0.1; done
  exit 0
fi
exit "$FAKE_SRUN_RC"
'''


@pytest.fixture
def slurm(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _write_exe(bin_dir / "srun", FAKE_SRUN)
  _write_exe(
    bin_dir / "scontrol", '#!/usr/bin/env bash\necho "$*" >> "$FAKE_ROOT/scontrol.calls"\n'
  )
  env = dict(
    os.environ,
    PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    FAKE_ROOT=str(tmp_path),
    SLURM_SUBMIT_DIR=str(tmp_path),
    SLURM_JOB_ID="4242",
  )
  return tmp_path, env


@pytest.mark.parametrize("rc, requeued", [(0, False), (1, False), (143, True)])
def test_slurm_requeues_on_143(slurm, rc, requeued):
  root, env = slurm
  r = subprocess.run(
    ["bash", str(SCRIPTS / "slurm_gpu.sbatch"), *TRAIN_ARGS],
    env=dict(env, FAKE_SRUN_RC=str(rc)),
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
  )
  assert r.returncode == rc, r.stderr
  assert (root / "srun.args").read_text() == (
    "--kill-on-bad-exit=1 .venv/bin/python -m geex_jax.training --distributed "
    + " ".join(TRAIN_ARGS)
    + "\n"
  )
  calls = root / "scontrol.calls"
  assert (calls.read_text() if calls.exists() else "") == ("requeue 4242\n" if requeued else "")


def test_slurm_requeues_when_the_batch_shell_is_signalled_too(slurm):
  """Preemption can SIGTERM the batch shell as well as the step: the shell must outlive srun."""
  root, env = slurm
  proc = subprocess.Popen(
    ["bash", str(SCRIPTS / "slurm_gpu.sbatch"), "--gin_file=x.gin"],
    env=dict(env, FAKE_SRUN_RC="wait"),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    start_new_session=True,
  )
  try:
    deadline = time.monotonic() + TIMEOUT
    while not (root / "srun.started").exists():
      assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
      time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # the whole job: batch shell and step
    _, err = proc.communicate(timeout=TIMEOUT)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
  assert proc.returncode == 143, err
  assert "got SIGTERM" in (root / "srun.args").read_text()
  assert (root / "scontrol.calls").read_text() == "requeue 4242\n"
