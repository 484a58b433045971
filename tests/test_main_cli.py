"""experiments/main.py on bad input: one `error:` line and the file holding the traceback, an
exit status, nothing built; and the reporting itself (vljax.errors) in-process."""
import glob
import importlib.util
import io
import logging
import os
import subprocess
import sys

import pytest

from vljax.errors import ConfigError, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(REPO, "experiments", "main.py")


def run_main(tmp_path, *args):
  env = dict(os.environ, TMPDIR=str(tmp_path))  # where a traceback goes without a workdir
  return subprocess.run([sys.executable, MAIN, "--config=clip_tiny.py", *args],
                        capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def test_config_typo_gives_one_error_line_and_the_traceback_file(tmp_path):
  workdir = tmp_path / "never_created"
  proc = run_main(tmp_path, "--config.optim.lrr=1e-3", f"--workdir={workdir}")
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert lines[-2:][0] == ("error: Unknown config key config.optim.lrr; did you mean "
                           "config.optim.lr?")
  assert [line for line in lines if line.startswith("error:")] == [lines[-2]]
  assert "Traceback" not in proc.stderr
  assert lines[-1].startswith("the full traceback is in ")
  log_file = lines[-1][len("the full traceback is in "):].split(" (")[0]
  assert os.path.dirname(log_file) == str(tmp_path)
  with open(log_file) as f:
    text = f.read()
  assert "Traceback" in text and "ConfigError" in text and "--config.optim.lrr=1e-3" in text
  assert not workdir.exists()


def test_verbose_shows_the_traceback(tmp_path):
  proc = run_main(tmp_path, "--config.optim.lr=-1", "--verbose", f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 2
  assert "Traceback (most recent call last)" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == "error: config.optim.lr must be > 0, got -1.0"
  assert not glob.glob(str(tmp_path / "*.log"))


def test_error_with_existing_workdir_is_logged_there(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  proc = run_main(tmp_path, "--config.optim.warmup_steps=5000",
                  "--config.mesh=[('data', -1), ('fsdp', 1), ('tensor', 1)]", f"--workdir={workdir}")
  assert proc.returncode == 2
  assert ("error: config.optim.warmup_steps=5000 is longer than the run (config.total_steps=1050); "
          "set it to at most 1050") in proc.stderr
  [log_file] = glob.glob(str(workdir / "logs" / "error-*.log"))
  assert log_file in proc.stderr
  assert sorted(os.listdir(workdir)) == ["logs"]  # nothing else was made


def test_report_maps_exceptions_to_one_line_and_status(tmp_path, monkeypatch):
  monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
  out = io.StringIO()
  assert report(ConfigError("config.x must be > 0"), stream=out) == 2
  assert report(ValueError("Non-finite loss\nmore detail"), workdir=str(tmp_path / "no"),
                stream=out) == 1
  assert report(KeyError("source"), status=3, stream=out) == 3
  lines = out.getvalue().splitlines()
  assert lines[0] == "error: config.x must be > 0"
  assert lines[2] == "error: Non-finite loss [...]"
  assert lines[4] == "error: KeyError: 'source'"
  assert all(line.startswith("the full traceback is in " + str(tmp_path)) for line in lines[1::2])
  assert not (tmp_path / "no").exists()
  workdir = tmp_path / "run"
  workdir.mkdir()
  out = io.StringIO()
  try:
    raise RuntimeError("boom")
  except RuntimeError as e:
    assert report(e, workdir=str(workdir), stream=out) == 1
  [log_file] = glob.glob(str(workdir / "logs" / "error-*.log"))
  with open(log_file) as f:
    assert "Traceback" in f.read()
  assert out.getvalue().splitlines() == [
      "error: RuntimeError: boom", f"the full traceback is in {log_file} (or rerun with --verbose)"]
  out = io.StringIO()
  assert report(KeyboardInterrupt("interrupted at step 7; checkpoint saved"), workdir=str(workdir),
                stream=out) == 130
  assert report(KeyboardInterrupt(), stream=out) == 130
  assert out.getvalue().splitlines() == ["stopped: interrupted at step 7; checkpoint saved",
                                         "stopped: interrupted (Ctrl-C)"]


@pytest.fixture(scope="module")
def main_module():
  """experiments/main.py imported once (it defines absl flags)."""
  if "vljax_experiments_main" not in sys.modules:
    spec = importlib.util.spec_from_file_location("vljax_experiments_main", MAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["vljax_experiments_main"] = module
  return sys.modules["vljax_experiments_main"]


def test_overrides_are_split_off_and_the_log_reaches_the_workdir(main_module, tmp_path):
  rest, overrides = main_module.split_overrides(
      ["main.py", "--config=clip_tiny.py", "--config.mesh=[('data', 2)]", "--workdir=w",
       "--config.model.image.variant=mu/16", "--", "--config.x=1"])
  assert rest == ["main.py", "--config=clip_tiny.py", "--workdir=w", "--", "--config.x=1"]
  assert overrides == ["mesh=[('data', 2)]", "model.image.variant=mu/16"]
  log = logging.getLogger("vljax")
  handlers = list(log.handlers)
  try:
    main_module._log_to_workdir(str(tmp_path))  # pylint: disable=protected-access
    log.warning("hello from the test")
  finally:
    for handler in log.handlers[len(handlers):]:
      handler.close()
    log.handlers[:] = handlers
  with open(tmp_path / "logs" / "train.log") as f:
    assert "hello from the test" in f.read()
