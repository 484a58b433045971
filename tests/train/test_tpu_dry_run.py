"""The TPU dry run: the real step compiled for a TPU slice by libtpu's compile-only client.

The compiles need libtpu (`pip install -e ".[tpu]"`, part of the test extra); without it those
tests are skipped and the fallback is tested with libtpu reported missing.
"""
import os
import subprocess
import sys

import jax
import pytest

from tests.train.helpers import tiny_config, xla_flags
from vljax.errors import ConfigError
from vljax.train import tpu
from vljax.train.dry_run import check_topology_mesh, dry_run, format_report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_libtpu = pytest.mark.skipif(not tpu.libtpu_available(), reason="libtpu is not installed")


@pytest.fixture(autouse=True)
def keep_the_compilation_cache():
  """A TPU dry run turns the persistent compilation cache off in its process (compile-only
  executables cannot be read back); the tests that run after these in the process keep it."""
  enabled = jax.config.jax_enable_compilation_cache
  yield
  jax.config.update("jax_enable_compilation_cache", enabled)


def small_config(**changes):
  config = tiny_config(**changes)
  config.mesh = [("data", -1), ("fsdp", 2), ("tensor", 1)]
  config.batch_size = 32
  return config


@needs_libtpu
def test_tiny_config_compiles_for_a_tpu_slice_and_fits():
  config = small_config()
  config.microbatches = 2
  report = dry_run(config, topology="v5e-4")
  assert report["backend"] == "tpu" and report["topology"] == "v5e-4" and report["chips"] == 4
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
  assert report["fits"] is True
  assert 0 < report["memory/peak_bytes_per_device"] < report["tpu/hbm_bytes"] == 16 * 2**30
  # The parameters are split over fsdp=2: each chip holds about half of them, in float32.
  params_bytes = 4 * report["params/total"]
  assert 0.45 * params_bytes < report["memory/param_bytes_per_device"] < 0.75 * params_bytes
  assert report["memory/optimizer_bytes_per_device"] >= 2 * report["memory/param_bytes_per_device"]
  # Model FLOPs do not depend on microbatching; the step time follows from them.
  config.microbatches = 1
  assert report["flops_per_step"] == pytest.approx(dry_run(config, topology="v5e-4")["flops_per_step"])
  assert report["step_seconds"] == pytest.approx(
      report["flops_per_step"] / (4 * 197e12 * report["mfu"]))
  text = format_report(report, "two_tower")
  assert "compiled for TPU slice v5e-4 (4 chips)" in text and ": fits," in text
  assert "CPU" not in text


@needs_libtpu
def test_an_overflowing_step_is_reported_not_raised():
  """A 4.3B-parameter text table cannot fit a 16 GiB v5e chip: the report says so."""
  config = small_config()
  config.mesh = [("data", 1), ("fsdp", 1), ("tensor", 1)]
  config.model.text.vocab_size = 2**22
  config.model.text.width = 1024
  report = dry_run(config, topology="v5e-1")
  assert report["fits"] is None
  assert "RESOURCE_EXHAUSTED" in report["compile_error"]
  assert report["memory/param_bytes_per_device"] > 16 * 2**30
  assert "DOES NOT FIT" in format_report(report, "two_tower")


def test_a_mesh_that_does_not_match_the_topology_names_both():
  config = small_config()
  config.mesh = [("data", 2), ("fsdp", 4), ("tensor", 1)]
  with pytest.raises(ConfigError, match=r"config.mesh \{data: 2, fsdp: 4, tensor: 1\} needs 8 "
                                        r"devices, but topology v5p-32 has 16 chips"):
    check_topology_mesh(config, tpu.parse_slice("v5p-32"))
  config.mesh = [("data", -1), ("fsdp", 32), ("tensor", 1)]
  with pytest.raises(ConfigError, match=r"needs a multiple of 32 devices, but topology v5e-16 "
                                        r"has 16 chips"):
    check_topology_mesh(config, tpu.parse_slice("v5e-16"))
  config.mesh = [("data", -1), ("fsdp", 4), ("tensor", 1)]
  check_topology_mesh(config, tpu.parse_slice("v5e-16"))


def test_without_libtpu_it_says_how_to_install_and_falls_back_to_cpu(monkeypatch):
  def missing(_):
    raise tpu.LibtpuMissing('libtpu is not installed: pip install -e ".[tpu]"')

  monkeypatch.setattr(tpu, "compile_only_devices", missing)
  config = small_config()
  report = dry_run(config, topology="v5e-4")
  assert report["backend"] == "cpu" and "topology" not in report
  text = format_report(report, "two_tower")
  assert 'pip install -e ".[tpu]"' in text.splitlines()[0]
  assert "per-device memory (CPU-compiled)" in text


def test_main_topology_flag_and_the_configs_slice():
  """--topology overrides config.tpu.topology; a mismatching mesh stops with both named."""
  env = dict(os.environ, XLA_FLAGS=xla_flags())
  proc = subprocess.run([sys.executable, "experiments/main.py", "--config=coca_large.py",
                         "--dry_run", "--topology=v5e-8"],
                        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert proc.returncode != 0
  assert ("config.mesh {data: -1, fsdp: 16, tensor: 1} needs a multiple of 16 devices, but "
          "topology v5e-8 has 8 chips") in proc.stderr
  proc = subprocess.run([sys.executable, "experiments/main.py", "--config=clip_tiny.py",
                         "--dry_run", "--config.tpu.topology=v7x-8"],
                        capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
  assert proc.returncode == 2 and "v7x" in proc.stderr
