"""Cloud TPU slices, for compiling a training step ahead of time for a real TPU topology.

A "TPU dry run" compiles the step on a host without a TPU: libtpu's compile-only client makes
stand-in devices for a named topology (`jax.experimental.topologies.get_topology_desc`), and
`jax.jit(...).lower(...).compile()` against a mesh of those devices gives the step's memory and
cost exactly as XLA would lay them out on that TPU. This module maps Cloud accelerator type names
("v5p-32", "v5litepod-16") to what that needs: the chip count, libtpu's topology name and chip
configuration, and the per-chip figures (HBM, peak bf16 FLOP/s) a report compares against.

Naming: v4-N and v5p-N count TensorCores (two per chip, so v5p-32 is 16 chips, 2x2x4);
v5e-N, v5litepod-N (the same chip under its older Cloud name) and v6e-N count chips. On v4 and
v5p, libtpu must be asked for the "megacore" chip configuration, which joins a chip's two cores
into one device; the compile-only devices are then one per chip, as on a real v4/v5p slice.

libtpu is an optional dependency (`pip install -e ".[tpu]"`); `libtpu_available()` says whether
it is installed, and `compile_only_devices` raises `LibtpuMissing` when it is not.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib.util
import math
import os
import re
from typing import Iterator

from vljax.errors import ConfigError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class _Generation:
  """One TPU generation: its chip and the slice shapes Cloud offers."""
  name: str  # "v5p"
  libtpu_prefix: str  # the generation as libtpu's topology names spell it
  device_kind: str  # jax Device.device_kind of its chips
  cores_per_chip: int  # TensorCores in one chip; N in "v4-N" / "v5p-N" counts these
  hbm_bytes: int  # per chip
  peak_flops: float  # per chip, dense bfloat16
  chip_config_name: str  # for get_topology_desc: "megacore" gives one device per chip
  shapes: dict[int, str]  # N of the Cloud name -> the slice's chip grid ("2x2x4")

  @property
  def counts(self) -> str:
    """What N in the Cloud name counts."""
    if self.cores_per_chip == 1:
      return "chips"
    return f"TensorCores ({self.cores_per_chip} per chip)"


def _shapes(table: str) -> dict[int, str]:
  """Parses "N:AxB N:AxBxC ..." (Cloud size, then the chip grid) into a dict."""
  out = {}
  for entry in table.split():
    size, shape = entry.split(":")
    out[int(size)] = shape
  return out


# Sizes and chip grids as MaxText's accelerator_to_spec_map.py lists them (AI-Hypercomputer/
# maxtext, src/maxtext/utils/accelerator_to_spec_map.py); per-chip figures from the Cloud TPU
# system architecture pages.
_2D_SHAPES = "1:1x1 4:2x2 8:2x4 16:4x4 32:4x8 64:8x8 128:8x16 256:16x16"
_V4_SHAPES = """
    8:2x2x1 16:2x2x2 32:2x2x4 64:2x4x4 128:4x4x4 256:4x4x8 384:4x4x12 512:4x8x8 1024:8x8x8
    1536:8x8x12 2048:8x8x16 4096:8x16x16"""
_V5P_SHAPES = """
    8:2x2x1 16:2x2x2 32:2x2x4 64:2x4x4 128:4x4x4 256:4x4x8 384:4x4x12 512:4x8x8 640:4x4x20
    768:4x8x12 896:4x4x28 1024:8x8x8 1152:4x12x12 1280:4x8x20 1408:4x4x44 1536:8x8x12
    1664:4x4x52 1792:4x8x28 1920:4x12x20 2048:8x8x16 2176:4x4x68 2304:8x12x12 2432:4x4x76
    2560:8x8x20 2688:4x12x28 2816:4x8x44 2944:4x4x92 3072:8x12x16 3200:4x20x20 3328:4x8x52
    3456:12x12x12 3584:8x8x28 3712:4x4x116 3840:8x12x20 3968:4x4x124 4096:8x16x16
    4224:4x12x44 4352:4x8x68 4480:4x20x28 4608:12x12x16 4736:4x4x148 4864:4x8x76
    4992:4x12x52 5120:8x16x20 5248:4x4x164 5376:8x12x28 5504:4x4x172 5632:8x8x44
    5760:12x12x20 5888:4x8x92 6016:4x4x188 6144:12x16x16 6272:4x28x28 6400:8x20x20
    6528:4x12x68 6656:8x8x52 6784:4x4x212 6912:12x12x24 7040:4x20x44 7168:8x16x28
    7296:4x12x76 7424:4x8x116 7552:4x4x236 7680:12x16x20 7808:4x4x244 7936:4x8x124
    8064:12x12x28 8192:16x16x16 8320:4x20x52 8448:8x12x44 8704:8x8x68 8832:4x12x92
    8960:8x20x28 9216:12x16x24 9472:4x8x148 9600:12x20x20 9728:8x8x76 9856:4x28x44
    9984:8x12x52 10240:16x16x20 10368:12x12x36 10496:4x8x164 10752:12x16x28 10880:4x20x68
    11008:4x8x172 11136:4x12x116 11264:8x16x44 11520:12x20x24 11648:4x28x52 11776:8x8x92
    11904:4x12x124 12032:4x8x188 12160:4x20x76 12288:16x16x24 13824:12x24x24
    17920:16x20x28"""

GENERATIONS: dict[str, _Generation] = {g.name: g for g in (
    _Generation("v4", "v4", "TPU v4", 2, 32 * GIB, 275e12, "megacore", _shapes(_V4_SHAPES)),
    _Generation("v5e", "v5e", "TPU v5 lite", 1, 16 * GIB, 197e12, "default",
                _shapes(_2D_SHAPES)),
    _Generation("v5p", "v5p", "TPU v5", 2, 95 * GIB, 459e12, "megacore", _shapes(_V5P_SHAPES)),
    _Generation("v6e", "v6e", "TPU v6 lite", 1, 32 * GIB, 918e12, "default",
                _shapes(_2D_SHAPES)),
)}
# Cloud names for a generation besides its own: v5e's accelerator types are "v5litepod-N".
ALIASES = {"v5litepod": "v5e"}
# The name gcloud's --accelerator-type takes, where it differs from the generation's.
_CLOUD_PREFIX = {"v5e": "v5litepod"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One Cloud TPU slice: what compiling for it, and reporting against it, needs."""
  name: str  # the Cloud name as given, normalised to lower case: "v5p-32", "v5litepod-16"
  generation: str  # "v4" | "v5e" | "v5p" | "v6e"
  chips: int
  topology: str  # libtpu's topology name: "v5p:2x2x4"
  hbm_bytes: int  # per chip
  peak_flops: float  # per chip, dense bfloat16 FLOP/s
  chip_config_name: str  # "megacore" (v4, v5p: one device per chip) or "default"

  @property
  def device_kind(self) -> str:
    """`jax.Device.device_kind` of this slice's chips ("TPU v5" for v5p)."""
    return GENERATIONS[self.generation].device_kind

  @property
  def shape(self) -> tuple[int, ...]:
    """The chip grid: (2, 2, 4) for v5p-32, (4, 4) for v5e-16."""
    return tuple(int(d) for d in self.topology.split(":", 1)[1].split("x"))

  @property
  def tensorcores(self) -> int:
    return self.chips * GENERATIONS[self.generation].cores_per_chip

  @property
  def accelerator_type(self) -> str:
    """The name for `gcloud compute tpus tpu-vm create --accelerator-type` ("v5e-16" is
    created as "v5litepod-16")."""
    prefix = _CLOUD_PREFIX.get(self.generation, self.generation)
    return f"{prefix}-{self.name.rsplit('-', 1)[1]}"

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Whether each axis of the chip grid wraps around (a torus link joins its ends).

    v4 and v5p slices are tori when every side is a multiple of 4 (64 chips and up, the
    shapes built from whole 4x4x4 cubes); v5e and v6e wrap an axis that spans a full pod side
    of 16 chips. The third entry is False for the 2D generations.
    """
    shape = self.shape
    if len(shape) == 3:
      torus = all(d % 4 == 0 for d in shape)
      return (torus, torus, torus)
    return (shape[0] == 16, shape[1] == 16, False)

  def topology_kwargs(self) -> dict:
    """Keyword arguments for `get_topology_desc` besides the topology name and platform."""
    kwargs = {"chip_config_name": self.chip_config_name, "wrap": self.wrap}
    if self.chips == 1:  # libtpu's default host is 2x2x1 chips, which a 1x1 slice cannot hold
      kwargs["chips_per_host_bounds"] = (1, 1, 1)
    return kwargs


def _slice(name: str, generation: _Generation, size: int) -> TpuSlice:
  shape = generation.shapes[size]
  return TpuSlice(name=name, generation=generation.name,
                  chips=math.prod(int(d) for d in shape.split("x")),
                  topology=f"{generation.libtpu_prefix}:{shape}", hbm_bytes=generation.hbm_bytes,
                  peak_flops=generation.peak_flops, chip_config_name=generation.chip_config_name)


# Every known slice under its canonical name (v5e's as "v5e-N"; "v5litepod-N" parses as well).
SLICES: dict[str, TpuSlice] = {
    f"{g.name}-{size}": _slice(f"{g.name}-{size}", g, size)
    for g in GENERATIONS.values() for size in g.shapes
}


def slice_names(generation: str | None = None) -> list[str]:
  """The canonical names of every known slice, or of one generation's ("v5e" or "v5litepod")."""
  if generation is None:
    return list(SLICES)
  gen = ALIASES.get(generation, generation)
  if gen not in GENERATIONS:
    raise ConfigError(f"unknown TPU generation {generation!r}; known: {_known_generations()}")
  return [f"{gen}-{size}" for size in GENERATIONS[gen].shapes]


def _known_generations() -> str:
  names = [f"{g}-N" for g in GENERATIONS]
  for alias, gen in ALIASES.items():
    names[list(GENERATIONS).index(gen)] += f" (or {alias}-N)"
  return ", ".join(names)


_NAME = re.compile(r"([a-z0-9]+)-(\d+)")


def parse_slice(name: str) -> TpuSlice:
  """The slice a Cloud accelerator type names: "v4-N", "v5e-N", "v5litepod-N", "v5p-N" or
  "v6e-N" (any case, surrounding spaces ignored). Raises ConfigError for an unknown generation
  or a size that generation does not come in."""
  if not isinstance(name, str):
    raise ConfigError(f"a TPU slice name must be a string such as 'v5p-32', not {name!r}")
  text = name.strip().lower()
  match = _NAME.fullmatch(text)
  if match is None:
    raise ConfigError(f"{name!r} is not a TPU slice name: expected GENERATION-N such as "
                      f"'v5p-32' or 'v5litepod-16' (generations: {_known_generations()})")
  prefix, size = match.group(1), int(match.group(2))
  gen_name = ALIASES.get(prefix, prefix)
  if gen_name not in GENERATIONS:
    raise ConfigError(f"{name!r}: unknown TPU generation {prefix!r}; known: "
                      f"{_known_generations()}")
  generation = GENERATIONS[gen_name]
  if size not in generation.shapes:
    sizes = ", ".join(str(s) for s in generation.shapes)
    raise ConfigError(f"{name!r} is not a {prefix} slice: in {prefix}-N, N counts "
                      f"{generation.counts}, and the valid sizes are {sizes}")
  return _slice(text, generation, size)


class LibtpuMissing(RuntimeError):
  """libtpu, which compiles for TPU topologies (no TPU needed), is not installed."""


def libtpu_available() -> bool:
  """Whether libtpu is installed (as the `libtpu` package, or at $TPU_LIBRARY_PATH); it is not
  loaded."""
  path = os.environ.get("TPU_LIBRARY_PATH")
  if path and os.path.isfile(path):
    return True
  return importlib.util.find_spec("libtpu") is not None


def _install_hint(tpu_slice: TpuSlice) -> str:
  import jax  # pylint: disable=import-outside-toplevel
  return (f"compiling for {tpu_slice.name} needs libtpu, which is not installed (no TPU is "
          f"needed, only the library): install it with pip install -e \".[tpu]\" (which adds "
          f"jax[tpu]=={jax.__version__}, the libtpu built for this jax)")


@functools.lru_cache(maxsize=None)
def _tpu_attached() -> bool:
  """Whether this host has TPU chips (then libtpu's environment is left to the TPU VM)."""
  try:
    from jax._src import hardware_utils  # pylint: disable=import-outside-toplevel
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # pylint: disable=broad-except
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


@contextlib.contextmanager
def _compile_only_env(tpu_slice: TpuSlice) -> Iterator[None]:
  """On a host without TPUs, sets (for the call only, and only where unset) the variables that
  a TPU VM would provide: without them libtpu prints warnings about TPU_ACCELERATOR_TYPE and
  TPU_WORKER_HOSTNAMES, and takes a machine-wide lock (/tmp/libtpu_lockfile) that makes a
  second process compiling for a TPU at the same time (another test worker) fail. The compile-
  only devices are the same with or without them."""
  values = {"TPU_ACCELERATOR_TYPE": tpu_slice.accelerator_type,
            "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  added = [] if _tpu_attached() else [k for k in values if k not in os.environ]
  for key in added:
    os.environ[key] = values[key]
  try:
    yield
  finally:
    for key in added:
      os.environ.pop(key, None)


@functools.lru_cache(maxsize=None)
def _devices(topology: str, kwargs: tuple) -> tuple:
  """libtpu's compile-only devices for a topology, made once per process."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  return tuple(topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                            **dict(kwargs)).devices)


def _plugin_missing(exc: BaseException) -> bool:
  """Whether `exc` from get_topology_desc means that JAX found no TPU plugin to load."""
  text = str(exc).lower()
  return "not installed" in text or "not implemented for tpu" in text


def compile_only_devices(tpu_slice: TpuSlice) -> list:
  """libtpu's compile-only devices for the slice, one per chip: a `jax.sharding.Mesh` of them
  lets `jax.jit(f).lower(...).compile()` compile for that TPU on any host. Made once per
  topology and process. Raises LibtpuMissing without libtpu."""
  if not libtpu_available():
    raise LibtpuMissing(_install_hint(tpu_slice))
  kwargs = tuple(sorted(tpu_slice.topology_kwargs().items()))
  try:
    with _compile_only_env(tpu_slice):
      devices = _devices(tpu_slice.topology, kwargs)
  except (RuntimeError, NotImplementedError) as e:
    if _plugin_missing(e):
      raise LibtpuMissing(f"{_install_hint(tpu_slice)} [{str(e).splitlines()[0]}]") from e
    raise RuntimeError(f"libtpu could not make the {tpu_slice.name} topology "
                       f"{tpu_slice.topology!r} ({dict(kwargs)}): {e}") from e
  if len(devices) != tpu_slice.chips:
    raise RuntimeError(
        f"libtpu made {len(devices)} compile-only devices for {tpu_slice.topology!r} "
        f"(chip_config_name={tpu_slice.chip_config_name!r}), but {tpu_slice.name} has "
        f"{tpu_slice.chips} chips: this libtpu does not give one device per chip")
  return list(devices)
