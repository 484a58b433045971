"""--dry_run reports parameters, FLOPs and compiled per-device memory without allocating."""
import os
import subprocess
import sys

import pytest

from tests.train.helpers import tiny_config
from vljax.train.dry_run import dry_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_dry_run_counts_flops_and_memory():
  config = tiny_config()
  config.mesh = [("data", 2), ("fsdp", 4), ("tensor", 1)]
  report = dry_run(config)
  assert report["params/total"] == report["params/img"] + report["params/txt"] + report["params/t"]
  assert report["memory/temp_bytes_per_device"] > 0
  assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  # FLOPs come from the unrolled program, so a scanned model reports the same count.
  scanned = tiny_config()
  scanned.mesh = config.mesh
  scanned.model["image"]["scan"] = True
  scanned.model["image"]["depth"] = 1
  assert dry_run(scanned)["flops_per_step"] == pytest.approx(report["flops_per_step"], rel=1e-3)
  # Doubling the image tower depth adds FLOPs (the scan body is not counted once only).
  deeper = tiny_config()
  deeper.mesh = config.mesh
  deeper.model["image"].update(scan=True, depth=3)
  assert dry_run(deeper)["flops_per_step"] > 1.2 * report["flops_per_step"]


def test_main_dry_run_and_missing_data_source():
  """The accelerator configs dry-run on a CPU host, and refuse to train without real data."""
  env = dict(os.environ, XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "experiments/main.py", "--config=clip_b16.py", "--dry_run",
                         "--config.batch_size=16", "--config.model.image.variant=mu/16",
                         "--config.model.text.variant=mu"],
                        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "per-device memory" in proc.stdout and "FLOPs per step" in proc.stdout
  proc = subprocess.run([sys.executable, "experiments/main.py", "--config=clip_b16.py",
                         "--workdir=/tmp/vljax_never_trains"],
                        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert proc.returncode != 0
  assert "config.data.source" in proc.stderr + proc.stdout
