"""Test set-up: 8 fake CPU devices, so sharded code paths run for real; XLA's CPU compiler set to
compile fast; one persistent JAX compilation cache per test run, so the many tiny runs that
compile the same programs (in this process, in xdist workers and in the subprocesses they start)
compile each once."""
import os
import shutil
import subprocess
import sys
import tempfile
import types

# Most of a test's time is XLA compiling tiny models, mostly LLVM optimisation and the newer CPU
# fusion emitters. The tests check what programs compute, not how fast the generated code runs,
# so they compile at LLVM -O0 with the classic emitters: 2-3x less compile time, steps of the
# tiny models stay milliseconds.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")


def _accepted(flags):
  """`flags` if this jaxlib knows them all (XLA aborts a process on an unknown flag), else ()."""
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                         env=dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu"),
                         capture_output=True, timeout=300, check=False)
  return flags if probe.returncode == 0 else ()


# Must happen before jax is imported anywhere in the test process. Workers and subprocesses
# inherit the environment, so they share the flags and the cache directory made here by the first
# process; tests that give a subprocess its own XLA_FLAGS add VLJAX_TEST_XLA_FLAGS to them.
if "VLJAX_TEST_XLA_FLAGS" not in os.environ:
  _given = os.environ.get("XLA_FLAGS", "")
  _fast = [f for f in _accepted(FAST_COMPILE_FLAGS) if f.split("=")[0] not in _given]
  os.environ["VLJAX_TEST_XLA_FLAGS"] = " ".join(_fast)
  os.environ["XLA_FLAGS"] = " ".join(
      [_given or "--xla_force_host_platform_device_count=8", *_fast]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vljax-test-jax-cache-")
  os.environ["VLJAX_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# open_clip (a parity reference) needs torchvision, and the one torchvision wheel PyPI has for
# the CPU torch the test extra pins (0.28.0 for torch 2.13.0) is a CUDA build whose compiled ops
# cannot load without CUDA libraries; importing it then fails while registering fake kernels
# for those ops (torchvision._meta_registrations), which breaks transformers' and open_clip's
# imports. The tests use only torchvision's Python transforms, so that one module is skipped.
sys.modules.setdefault("torchvision._meta_registrations",
                       types.ModuleType("torchvision._meta_registrations"))


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  """The process that made the cache removes it when the run ends."""
  if os.environ.get("VLJAX_TEST_CACHE_OWNER") == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
