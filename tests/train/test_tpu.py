"""Cloud TPU slice names, their figures, and libtpu's compile-only devices for them.

The device tests need libtpu (`pip install -e ".[tpu]"`) but no TPU; they are skipped without it.
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vljax.errors import ConfigError
from vljax.train import tpu
from vljax.train.tpu import (GIB, SLICES, LibtpuMissing, TpuSlice, compile_only_devices,
                             libtpu_available, parse_slice, slice_names)

needs_libtpu = pytest.mark.skipif(not libtpu_available(),
                                  reason='libtpu is not installed (pip install -e ".[tpu]")')


@pytest.mark.parametrize("name, generation, chips, topology, config", [
    ("v4-8", "v4", 4, "v4:2x2x1", "megacore"),
    ("v4-32", "v4", 16, "v4:2x2x4", "megacore"),
    ("v4-128", "v4", 64, "v4:4x4x4", "megacore"),
    ("v5p-8", "v5p", 4, "v5p:2x2x1", "megacore"),
    ("v5p-32", "v5p", 16, "v5p:2x2x4", "megacore"),
    ("v5p-17920", "v5p", 8960, "v5p:16x20x28", "megacore"),
    ("v5e-1", "v5e", 1, "v5e:1x1", "default"),
    ("v5e-4", "v5e", 4, "v5e:2x2", "default"),
    ("v5e-256", "v5e", 256, "v5e:16x16", "default"),
    ("v5litepod-16", "v5e", 16, "v5e:4x4", "default"),
    ("v6e-8", "v6e", 8, "v6e:2x4", "default"),
    ("v6e-128", "v6e", 128, "v6e:8x16", "default"),
])
def test_parse_each_generation(name, generation, chips, topology, config):
  s = parse_slice(name)
  assert isinstance(s, TpuSlice)
  assert (s.name, s.generation, s.chips, s.topology, s.chip_config_name) == (
      name, generation, chips, topology, config)
  assert math.prod(s.shape) == chips


def test_v4_and_v5p_count_tensorcores_the_others_chips():
  assert parse_slice("v5p-32").chips == 16 and parse_slice("v5p-32").tensorcores == 32
  assert parse_slice("v4-8").chips == 4 and parse_slice("v4-8").tensorcores == 8
  assert parse_slice("v5e-16").chips == 16 and parse_slice("v5e-16").tensorcores == 16
  assert parse_slice("v5litepod-16").chips == 16
  assert parse_slice("v6e-16").chips == 16


def test_case_and_spaces_are_ignored_and_v5litepod_keeps_its_name():
  assert parse_slice("  V5P-32 ") == parse_slice("v5p-32")
  lite = parse_slice("V5LitePod-16")
  assert lite.name == "v5litepod-16" and lite.generation == "v5e"
  assert lite.topology == parse_slice("v5e-16").topology
  # gcloud creates v5e slices under their v5litepod name.
  assert parse_slice("v5e-16").accelerator_type == "v5litepod-16"
  assert lite.accelerator_type == "v5litepod-16"
  assert parse_slice("v5p-32").accelerator_type == "v5p-32"


def test_per_chip_figures_and_device_kinds():
  figures = {"v4-8": (32 * GIB, 275e12, "TPU v4"), "v5e-4": (16 * GIB, 197e12, "TPU v5 lite"),
             "v5p-8": (95 * GIB, 459e12, "TPU v5"), "v6e-4": (32 * GIB, 918e12, "TPU v6 lite")}
  for name, (hbm, flops, kind) in figures.items():
    s = parse_slice(name)
    assert (s.hbm_bytes, s.peak_flops, s.device_kind) == (hbm, flops, kind), name
    assert isinstance(s.hbm_bytes, int) and isinstance(s.peak_flops, float)


def test_table_is_consistent():
  """Every listed size is the chip grid's chip count times the cores N counts per chip."""
  counts = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
  assert len(SLICES) == 12 + 96 + 8 + 8  # MaxText's v4, v5p, v5e and v6e sizes
  for name, s in SLICES.items():
    assert s.name == name and parse_slice(name) == s
    assert s.chips * counts[s.generation] == int(name.rsplit("-", 1)[1])
    assert len(s.shape) == (3 if s.generation in ("v4", "v5p") else 2)
    assert s.topology.startswith(s.generation + ":")
  assert slice_names("v5litepod") == slice_names("v5e") == [
      "v5e-1", "v5e-4", "v5e-8", "v5e-16", "v5e-32", "v5e-64", "v5e-128", "v5e-256"]
  assert slice_names() == list(SLICES)


def test_wraparound_links():
  assert parse_slice("v4-64").wrap == (False, False, False)
  assert parse_slice("v4-128").wrap == (True, True, True)
  assert parse_slice("v5p-640").wrap == (True, True, True)
  assert parse_slice("v5e-64").wrap == (False, False, False)
  assert parse_slice("v5e-128").wrap == (False, True, False)
  assert parse_slice("v6e-256").wrap == (True, True, False)
  assert "chips_per_host_bounds" in parse_slice("v6e-1").topology_kwargs()
  assert "chips_per_host_bounds" not in parse_slice("v6e-4").topology_kwargs()


@pytest.mark.parametrize("name, expected", [
    ("v3-8", ["'v3-8'", "unknown TPU generation 'v3'",
              "v4-N, v5e-N (or v5litepod-N), v5p-N, v6e-N"]),
    ("tpu7x-8", ["unknown TPU generation 'tpu7x'", "v6e-N"]),
    ("v5p", ["'v5p' is not a TPU slice name", "GENERATION-N"]),
    ("", ["is not a TPU slice name"]),
    ("v5p-12", ["'v5p-12' is not a v5p slice", "N counts TensorCores (2 per chip)",
                "8, 16, 32, 64, 128", "17920"]),
    ("v4-4", ["'v4-4' is not a v4 slice", "TensorCores",
              "8, 16, 32, 64, 128, 256, 384, 512, 1024"]),
    ("v5e-2", ["'v5e-2'", "N counts chips", "1, 4, 8, 16, 32, 64, 128, 256"]),
    ("v5litepod-12", ["'v5litepod-12' is not a v5litepod slice", "N counts chips", "1, 4, 8"]),
    ("v6e-512", ["'v6e-512'", "N counts chips", "128, 256"]),
])
def test_errors_name_the_bad_name_and_the_valid_ones(name, expected):
  with pytest.raises(ConfigError) as info:
    parse_slice(name)
  for text in expected:
    assert text in str(info.value), (text, str(info.value))


def test_a_non_string_is_refused():
  with pytest.raises(ConfigError, match="must be a string"):
    parse_slice(32)
  with pytest.raises(ConfigError, match="unknown TPU generation 'v3'"):
    slice_names("v3")


def test_libtpu_missing_is_reported_with_the_install_command(monkeypatch):
  monkeypatch.setattr(tpu, "libtpu_available", lambda: False)
  with pytest.raises(LibtpuMissing) as info:
    compile_only_devices(parse_slice("v5e-4"))
  assert isinstance(info.value, RuntimeError)
  assert 'pip install -e ".[tpu]"' in str(info.value) and "v5e-4" in str(info.value)
  assert f"jax[tpu]=={jax.__version__}" in str(info.value)


def test_a_missing_tpu_plugin_is_reported_as_libtpu_missing(monkeypatch):
  """libtpu importable, but JAX cannot load a TPU plugin from it."""
  from jax.experimental import topologies

  def no_plugin(*args, **kwargs):
    raise RuntimeError("JAX TPU support not installed; cannot generate TPU topology.")

  monkeypatch.setattr(tpu, "libtpu_available", lambda: True)
  monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
  tpu._devices.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(LibtpuMissing, match=r'pip install -e "\.\[tpu\]"'):
      compile_only_devices(parse_slice("v6e-4"))
  finally:
    tpu._devices.cache_clear()  # pylint: disable=protected-access


@needs_libtpu
@pytest.mark.parametrize("name, chips, kind", [
    ("v5p-8", 4, "TPU v5"), ("v4-8", 4, "TPU v4"), ("v5e-4", 4, "TPU v5 lite"),
    ("v6e-1", 1, "TPU v6 lite"), ("v5litepod-16", 16, "TPU v5 lite"), ("v4-128", 64, "TPU v4"),
])
def test_compile_only_devices_one_per_chip(name, chips, kind):
  before = {k: os.environ.get(k) for k in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES",
                                           "ALLOW_MULTIPLE_LIBTPU_LOAD")}
  devices = compile_only_devices(parse_slice(name))
  assert len(devices) == chips
  assert {d.device_kind for d in devices} == {kind}
  assert {d.platform for d in devices} == {"tpu"}
  assert len({d.id for d in devices}) == chips
  assert compile_only_devices(parse_slice(name)) == devices  # cached per topology
  # The variables that quiet libtpu are set for the call only.
  assert {k: os.environ.get(k) for k in before} == before


@needs_libtpu
def test_a_sharded_function_compiles_for_v5e_4():
  devices = compile_only_devices(parse_slice("v5e-4"))
  mesh = Mesh(np.array(devices).reshape(2, 2), ("data", "model"))

  def f(x, w):
    return jnp.tanh(x @ w).sum()

  x = jax.ShapeDtypeStruct((64, 128), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P("data", None)))
  w = jax.ShapeDtypeStruct((128, 256), jnp.bfloat16,
                           sharding=NamedSharding(mesh, P(None, "model")))
  compiled = jax.jit(f).lower(x, w).compile()
  memory = compiled.memory_analysis()
  assert memory is not None
  assert memory.argument_size_in_bytes == (64 * 128 // 2 + 128 * 256 // 2) * 2  # per device
