"""Test set-up: 8 fake CPU devices, so sharded code paths run for real; one persistent JAX
compilation cache per test run, so the many tiny runs that compile the same programs (in this
process, in xdist workers and in the subprocesses they start) compile each once."""
import os
import shutil
import tempfile

# Must happen before jax is imported anywhere in the test process. Workers and subprocesses
# inherit the environment, so they share the cache directory made here by the first process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="vljax-test-jax-cache-")
  os.environ["VLJAX_TEST_CACHE_OWNER"] = str(os.getpid())
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_unconfigure(config):  # pylint: disable=unused-argument
  """The process that made the cache removes it when the run ends."""
  if os.environ.get("VLJAX_TEST_CACHE_OWNER") == str(os.getpid()):
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
