"""Mesh construction from the config and derivation of shardings from logical axis names.

A config names mesh axes and their sizes, e.g. `[("data", -1), ("fsdp", 1), ("tensor", 1)]`
(-1 takes the remaining devices), and maps logical names to mesh axes with `rules`. Parameter
shardings are never written by hand: `eval_shape` gives the logically boxed tree, and the rules
turn each logical spec into a `NamedSharding`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical name -> mesh axis (or axes). Parameters: embed/mlp/heads/kv/vocab/layers;
# activations: batch/seq/act_*. FSDP shards parameters along "embed" and the batch; tensor
# parallelism splits heads, MLP and vocabulary.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with the named axes; one size may be -1 to take all remaining devices."""
  devices = list(jax.devices() if devices is None else devices)
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"mesh axis names repeat: {names}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(axes)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into mesh {dict(axes)}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, "
                     f"but {len(devices)} are available")
  try:
    device_array = jax.experimental.mesh_utils.create_device_mesh(sizes, devices)
  except Exception:  # pylint: disable=broad-except  # CPU / unusual topologies
    device_array = np.asarray(devices).reshape(sizes)
  return Mesh(device_array, tuple(names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES, ndim: int = 1) -> NamedSharding:
  """Sharding of a global batch array: leading axis over the mesh axes "batch" maps to."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, _only_mesh_axes(spec, mesh))


def _only_mesh_axes(spec: P, mesh: Mesh) -> P:
  """Drops mesh axis names absent from `mesh` (rules may name axes a small mesh lacks)."""
  def keep(entry):
    if entry is None:
      return None
    if isinstance(entry, (tuple, list)):
      kept = tuple(a for a in entry if a in mesh.axis_names)
      return kept if kept else None
    return entry if entry in mesh.axis_names else None
  return P(*(keep(e) for e in spec))


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES):
  """NamedShardings for a (logically boxed) abstract tree, e.g. from `jax.eval_shape(init)`."""
  logical_specs = nn.get_partition_spec(abstract_tree)
  def to_sharding(spec):
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if spec is not None else P()
    return NamedSharding(mesh, _only_mesh_axes(mesh_spec, mesh))
  return jax.tree.map(to_sharding, logical_specs, is_leaf=lambda x: isinstance(x, P) or x is None)
