"""Multi-process training, SIGKILL / SIGTERM resume and restoring onto another mesh, with real
processes (each a `tests.train.worker`)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests.train.helpers import xla_flags
from vljax.train.checkpoint import Checkpointer, load_params
from vljax.train.reporting import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# For runs whose evaluation no test reads: the final evaluation (sets, compiles, samples.png)
# would be most of such a short run's time.
NO_EVALS = {"evals": {}}


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  for key in ("VLJAX_COORDINATOR_ADDRESS", "VLJAX_NUM_PROCESSES", "VLJAX_PROCESS_ID"):
    env.pop(key, None)
  env.update({k: str(v) for k, v in extra.items()})
  return env


def _worker(workdir, steps, changes, devices, **env):
  return subprocess.Popen([sys.executable, "-m", "tests.train.worker", str(workdir), str(steps),
                           json.dumps(changes)], cwd=REPO, env=_env(devices, **env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=300) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]
  return out


def _losses(workdir) -> dict[int, float]:
  """step -> loss; a step logged twice (before a kill and after the resume) keeps the last."""
  return {r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if "train/loss" in r}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
  mesh = {"mesh": [["data", 4], ["fsdp", 1], ["tensor", 1]]}
  single = tmp_path / "single"
  _finish(_worker(single, 3, {**mesh, **NO_EVALS}, devices=4))  # the reference: losses, params
  multi = tmp_path / "multi"  # evaluates too, with both processes
  port = _free_port()
  procs = [_worker(multi, 3, mesh, devices=2, VLJAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                   VLJAX_NUM_PROCESSES=2, VLJAX_PROCESS_ID=i) for i in range(2)]
  outputs = [_finish(p) for p in procs]
  assert "Process 1 of 2" in outputs[1]
  single_losses, multi_losses = _losses(single), _losses(multi)
  assert sorted(multi_losses) == [1, 2, 3]
  # The two processes read the same 16 examples per step in another row order; the contrastive
  # loss does not depend on the order, so only float32 summation order differs.
  np.testing.assert_allclose([multi_losses[s] for s in (1, 2, 3)],
                             [single_losses[s] for s in (1, 2, 3)], rtol=1e-5)
  a, b = load_params(str(single)), load_params(str(multi))
  jax_tree_allclose(a, b, atol=2e-6)


def jax_tree_allclose(a, b, atol):
  import jax  # pylint: disable=import-outside-toplevel
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=atol), a, b)


def test_sigkill_then_rerun_reproduces_the_uninterrupted_losses(tmp_path):
  steps, changes = 24, {"checkpoint_every": 4, **NO_EVALS}
  full = tmp_path / "full"
  _finish(_worker(full, steps, changes, devices=1))
  killed = tmp_path / "killed"
  proc = _worker(killed, steps, changes, devices=1)
  deadline = time.time() + 300
  while time.time() < deadline and max(_losses(killed), default=0) < steps // 2:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  logged_before_kill = max(_losses(killed), default=0)
  assert 0 < logged_before_kill < steps, "the kill must land mid-run"
  resumed_from = Checkpointer(str(killed)).latest_step()
  out = _finish(_worker(killed, steps, changes, devices=1))
  assert f"Resuming from the checkpoint at step {resumed_from}" in out
  assert logged_before_kill - resumed_from < 4 + 1  # lost at most the steps since the checkpoint
  full_losses, resumed_losses = _losses(full), _losses(killed)
  assert sorted(resumed_losses) == list(range(1, steps + 1))
  for step in range(resumed_from + 1, steps + 1):  # bitwise equal after the restart
    assert resumed_losses[step] == full_losses[step], step


def test_sigterm_checkpoints_at_the_next_step_and_exits_cleanly(tmp_path):
  proc = _worker(tmp_path, 200, {"checkpoint_every": 1000}, devices=1)
  deadline = time.time() + 300
  while time.time() < deadline and max(_losses(tmp_path), default=0) < 3:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc)
  assert "Stop requested (SIGTERM)" in out
  step = Checkpointer(str(tmp_path)).latest_step()
  assert 3 <= step < 200


def test_checkpoint_restores_onto_another_mesh_and_continues(tmp_path):
  _finish(_worker(tmp_path, 3, {"mesh": [["data", 2], ["fsdp", 4], ["tensor", 1]], **NO_EVALS},
                  devices=8))
  out = _finish(_worker(tmp_path, 5, {"mesh": [["data", 2], ["fsdp", 1], ["tensor", 1]],
                                      **NO_EVALS}, devices=2))
  assert "Resuming from the checkpoint at step 3" in out
  assert sorted(_losses(tmp_path)) == [1, 2, 3, 4, 5]
  assert Checkpointer(str(tmp_path)).latest_step() == 5
