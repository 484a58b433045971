"""SIGTERM and SIGINT (Ctrl-C) stop a run wherever it is, within seconds, save what a resume needs
and never a half-read batch: in a stalled input pipeline, at a step boundary, through main.py."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest

from tests.train.helpers import small_evals, tiny_config, xla_flags
from vljax.train import loop
from vljax.train.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 8


def _config(evaluate: bool = True):
  """Evaluates at the end (`evaluate`), so a completed run returns metrics, a stopped one {}."""
  c = tiny_config(total_steps=STEPS, log_every=1, checkpoint_every=100)
  c.evals = small_evals(retrieval=16) if evaluate else {}
  return c


def _losses(workdir) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["train/loss"] for r in map(json.loads, f) if "train/loss" in r}


class _StallingIterator:
  """Delegates to the real input iterator, but its `stall_at`-th batch reads a batch (moving the
  iterator on) and then blocks, as a hung file system or an endless run of bad records would,
  until `signum` (sent to this process from a timer) interrupts it."""

  def __init__(self, iterator, stall_at: int, signum: int):
    self.iterator, self.stall_at, self.signum, self.calls = iterator, stall_at, signum, 0

  def __next__(self):
    self.calls += 1
    if self.calls == self.stall_at:
      next(self.iterator)
      threading.Timer(0.5, os.kill, (os.getpid(), self.signum)).start()
      time.sleep(120)
      raise AssertionError("the stop signal did not interrupt the input pipeline")
    return next(self.iterator)

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


def _stall(monkeypatch, stall_at, signum):
  real = loop.train_iterator
  monkeypatch.setattr(loop, "train_iterator",
                      lambda *a, **k: _StallingIterator(real(*a, **k), stall_at, signum))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  loop.train_and_evaluate(_config(evaluate=False), workdir)
  return _losses(workdir)


def test_sigterm_in_a_stalled_input_pipeline_saves_the_last_step_and_resumes_exactly(
    tmp_path, monkeypatch, uninterrupted):
  workdir = str(tmp_path)
  _stall(monkeypatch, stall_at=5, signum=signal.SIGTERM)
  t0 = time.time()
  assert loop.train_and_evaluate(_config(), workdir) == {}
  assert time.time() - t0 < 100  # the 120 s sleep was cut short
  assert Checkpointer(workdir).latest_step() == 4  # the step before the stalled batch
  monkeypatch.undo()
  loop.train_and_evaluate(_config(evaluate=False), workdir)
  resumed = _losses(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):  # the half-read batch was read again, nothing skipped
    assert resumed[step] == uninterrupted[step], step


def test_ctrl_c_saves_and_raises_keyboard_interrupt(tmp_path, monkeypatch):
  _stall(monkeypatch, stall_at=3, signum=signal.SIGINT)
  with pytest.raises(KeyboardInterrupt, match="interrupted at step 2; checkpoint saved"):
    loop.train_and_evaluate(_config(), str(tmp_path))
  assert Checkpointer(str(tmp_path)).latest_step() == 2
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


CONFIG_FILE = '''
from tests.train.helpers import tiny_config


def get_config():
  return tiny_config(total_steps=100000, log_every=1, checkpoint_every=100000, evals={})
'''


def _main(tmp_path, *args):
  config = tmp_path / "stop_config.py"
  config.write_text(CONFIG_FILE)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path),
             XLA_FLAGS=xla_flags(1))
  return subprocess.Popen([sys.executable, os.path.join(REPO, "experiments", "main.py"),
                           f"--config={config}", f"--workdir={tmp_path / 'run'}", *args],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _wait_for(proc, text, timeout=120):
  """Reads the process's output until a line contains `text`; returns the lines read."""
  lines, deadline = [], time.time() + timeout
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if text in line:
      return lines
  proc.kill()
  raise AssertionError(f"{text!r} never came:\n{''.join(lines)}")


def test_sigterm_stops_an_endless_run_of_bad_records_within_seconds(tmp_path):
  """Only corrupt images and a bad-record limit that is never reached: the batcher spins."""
  shard = tmp_path / "bad.tar"
  with tarfile.open(shard, "w") as tar:
    for i in range(20):
      for name, data in ((f"{i:03d}.jpg", b"not a jpeg"), (f"{i:03d}.txt", b"a caption")):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  proc = _main(tmp_path, "--config.data.source=webdataset", f"--config.data.webdataset.shards={shard}",
               "--config.data.max_bad_fraction=1.0",
               f"--config.data.min_records_before_check={10**12}")
  _wait_for(proc, "Training steps")
  time.sleep(2)  # inside the spinning batcher by now
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=60)
  assert time.time() - t0 < 15, out
  assert proc.returncode == 0, out
  assert "Stop requested (SIGTERM): no step since the start to save" in out


def test_ctrl_c_through_main_saves_and_exits_130(tmp_path):
  proc = _main(tmp_path)
  _wait_for(proc, "step 3:")
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 130, out
  assert "Traceback" not in out
  last = [line for line in out.splitlines() if line.startswith("stopped: interrupted at step")]
  assert last and last[0].endswith("checkpoint saved"), out
  step = int(last[0].split("step ")[1].split(";")[0])
  assert Checkpointer(str(tmp_path / "run")).latest_step() == step
  # An ordinary resume says so and prints no warning (orbax used to warn of items it "could not
  # restore" on every resume).
  proc = _main(tmp_path, f"--config.total_steps={step + 1}", "--config.optim.warmup_steps=1")
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert f"Resuming from the checkpoint at step {step}" in out
  assert "could not" not in out and "WARNING" not in out, out


def test_a_stop_during_the_last_step_saves_it(tmp_path, monkeypatch):
  """A signal noted while the last step runs (not in an interruptible section) still saves it."""
  monkeypatch.setattr(loop.StopWatcher, "requested", lambda self: True)
  config = _config()
  config.total_steps = 1
  config.optim.warmup_steps = 1
  assert loop.train_and_evaluate(config, str(tmp_path)) == {}
  assert Checkpointer(str(tmp_path)).latest_step() == 1
