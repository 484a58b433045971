"""`--dry_run`: what a config would cost, without allocating anything on a device.

Prints the parameter count of each tower, the model FLOPs of one training step, and the compiled
per-device memory of the step for the configured mesh and batch (from XLA's
`memory_analysis()`), then returns. Parameters, optimizer state and the batch exist only as
shapes with shardings.

With a TPU topology (`--topology=v5p-32`, or the config's `config.tpu.topology`), the real step
is compiled for that slice by libtpu's compile-only client on this host (no TPU needed), and the
report says per chip what the parameters, optimizer state, temporaries, outputs and code take of
the chip's HBM, whether it fits, and the step time at a stated MFU. An overflow is reported
from XLA's RESOURCE_EXHAUSTED error with the bytes it needed. Without libtpu installed it says
how to install it and falls back to the CPU compile. CPU-compiled memory is an upper bound on
what a TPU or GPU needs (see `CPU_MEMORY_NOTE`).
"""
from __future__ import annotations

import copy
import logging
import math
import re
import time
from typing import Any

import jax
import numpy as np

from vljax.errors import ConfigError
from vljax.sharding import batch_sharding
from vljax.train import tpu
from vljax.train.loop import Experiment, build_experiment

log = logging.getLogger("vljax")

# The model FLOPs utilisation the step time of a TPU dry run assumes (`--mfu`).
DEFAULT_MFU = 0.4

# Measured on coca_large.py (fsdp=16, batch 256 per device): temporaries of 92.9 GiB compiled
# for CPU, 55 GiB with --xla_disable_hlo_passes=while-loop-invariant-code-motion, ~44 GiB
# compiled for real TPUs.
CPU_MEMORY_NOTE = (
    "  These memory figures were compiled for the CPU backend. XLA's CPU backend keeps extra\n"
    "  float32 copies (e.g. of the bfloat16 activations saved for the backward pass) and does not\n"
    "  apply the accelerators' memory optimisations, so the TPU/GPU figure is typically lower:\n"
    "  about 40% lower for CoCa-Large (92.9 GiB of temporaries on CPU, ~55 GiB with the\n"
    "  while-loop-invariant-code-motion pass disabled, ~44 GiB compiled for real TPUs). For\n"
    "  TPU-exact figures compile for the slice: --topology=v5p-32 (needs libtpu: pip install -e\n"
    "  \".[tpu]\").")


def _model_flops_config(model_cfg: Any) -> Any:
  """The model config with every `scan` and `remat` switched off: XLA's cost analysis counts a
  scanned loop body once, and rematerialisation adds recomputed (non-model) FLOPs."""
  if isinstance(model_cfg, dict):
    return {k: (False if k == "scan" else "none" if k == "remat" else _model_flops_config(v))
            for k, v in model_cfg.items()}
  return model_cfg


def abstract_inputs(exp: Experiment):
  """ShapeDtypeStructs (with shardings) of the state and one global batch."""
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       exp.abstract_state, exp.shardings)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(exp.mesh, exp.rules, len(v.shape)))
           for k, v in exp.batch_spec.items()}
  return state, batch


def model_flops(config, tokenizer) -> float:
  """FLOPs of one training step over the whole global batch, as the model defines them (no
  rematerialisation, no microbatching recomputation): from XLA's cost analysis of the unrolled,
  unsharded step lowered for one CPU device (lowering allocates and compiles nothing)."""
  cfg = copy.deepcopy(config)
  cfg.model = _model_flops_config(config.model.to_dict())
  cfg.microbatches = 1
  cfg.optim.offload = False
  cfg.mesh = [(name, 1) for name, _ in config.mesh]
  if cfg.loss.impl == "ring":  # the ring needs a sharded batch; the chunked loss has its FLOPs
    cfg.loss.impl = "chunked"
  exp = build_experiment(cfg, devices=jax.devices("cpu")[:1], tokenizer=tokenizer)
  with exp.context():
    cost = exp.train_step.lower(*abstract_inputs(exp)).cost_analysis()
  return float(cost["flops"])


def _shard_bytes(abstract: Any, shardings: Any) -> int:
  """Bytes of one device's shards of a tree of arrays."""
  return int(sum(math.prod(s.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
                 for a, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings))))


def check_topology_mesh(config, tpu_slice: tpu.TpuSlice) -> None:
  """Raises, naming both, when config.mesh cannot be laid over the slice's chips."""
  sizes = [int(size) for _, size in config.mesh]
  fixed = math.prod(s for s in sizes if s != -1)
  mesh = "{" + ", ".join(f"{name}: {size}" for name, size in config.mesh) + "}"
  if -1 in sizes:
    if tpu_slice.chips % fixed:
      raise ConfigError(f"config.mesh {mesh} needs a multiple of {fixed} devices, but topology "
                        f"{tpu_slice.name} has {tpu_slice.chips} chips")
  elif fixed != tpu_slice.chips:
    raise ConfigError(f"config.mesh {mesh} needs {fixed} devices, but topology {tpu_slice.name} "
                      f"has {tpu_slice.chips} chips")


_NEEDED = re.compile(r"(?:Used|used|requires?|allocate)\D{0,40}?([\d.]+)\s*([KMGT]i?B?)\b")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _needed_bytes(message: str) -> int | None:
  """The bytes a RESOURCE_EXHAUSTED compile error says the program needed, if it says."""
  found = [float(v) * _UNITS[u[0]] for v, u in _NEEDED.findall(message)]
  return int(max(found)) if found else None


def _memory_report(compiled) -> dict[str, int]:
  memory = compiled.memory_analysis()
  report = {
      "memory/argument_bytes_per_device": int(memory.argument_size_in_bytes),
      "memory/output_bytes_per_device": int(memory.output_size_in_bytes),
      "memory/temp_bytes_per_device": int(memory.temp_size_in_bytes),
      "memory/alias_bytes_per_device": int(memory.alias_size_in_bytes),
      "memory/code_bytes_per_device": int(memory.generated_code_size_in_bytes),
      "memory/host_bytes_per_device": int(memory.host_argument_size_in_bytes
                                          + memory.host_temp_size_in_bytes),
  }
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
           - memory.alias_size_in_bytes)
  report["memory/total_bytes_per_device"] = int(total)
  # What must fit in HBM at once: XLA's peak of live buffers (falls back to the sum).
  peak = int(getattr(memory, "peak_memory_in_bytes", 0) or 0)
  report["memory/peak_bytes_per_device"] = peak or int(total + memory.generated_code_size_in_bytes)
  return report


def format_report(report: dict[str, Any], model_name: str | None) -> str:
  """The lines `dry_run` logs; memory from a CPU compile is labelled so, with what that means."""
  on_cpu = report["backend"] == "cpu"
  target = (f"TPU slice {report['topology']} ({report['chips']} chips)" if "topology" in report
            else f"the {report['backend']} backend")
  lines = [f"Dry run of {model_name} on mesh {report['mesh']}, global batch "
           f"{report['batch_size']} in {report.get('microbatches', 1)} microbatch(es), compiled "
           f"for {target}:"]
  if report.get("fallback"):
    lines.insert(0, report["fallback"])
  lines += [f"  parameters {k[7:]:>10}: {v / 1e6:10.1f}M" for k, v in report.items()
            if k.startswith("params/")]
  lines.append(f"  FLOPs per step (whole mesh): {report['flops_per_step'] / 1e12:.2f} TFLOP")
  if "topology" in report:
    return "\n".join(lines + _tpu_lines(report))
  label = "per-device memory (CPU-compiled)" if on_cpu else "per-device memory"
  for key in ("argument", "output", "temp", "alias", "total"):
    lines.append(f"  {label} {key:>9}: "
                 f"{report[f'memory/{key}_bytes_per_device'] / 2**30:8.2f} GiB")
  if on_cpu:
    lines.append(CPU_MEMORY_NOTE)
  return "\n".join(lines)


def _tpu_lines(report: dict[str, Any]) -> list[str]:
  gib = lambda key: f"{report[key] / 2**30:8.2f} GiB"
  hbm = report["tpu/hbm_bytes"]
  lines = [f"  per chip: parameters {gib('memory/param_bytes_per_device')}, optimizer state "
           f"{gib('memory/optimizer_bytes_per_device')}"
           + (" (in host memory)" if report.get("offload") else "")]
  if report["fits"] is None:
    needed = report.get("memory/needed_bytes_per_device")
    lines.append(f"  DOES NOT FIT: XLA could not place the step in the {hbm / 2**30:.1f} GiB of "
                 f"HBM per chip" + (f" (it needed {needed / 2**30:.2f} GiB)" if needed else ""))
    lines.append(f"  {report['compile_error']}")
    return lines
  for key, name in (("argument", "arguments (params, optimizer, batch)"),
                    ("temp", "activations / temporaries"), ("output", "outputs"),
                    ("alias", "outputs aliasing arguments"), ("code", "code"),
                    ("host", "host memory (offloaded)")):
    lines.append(f"  per chip {name:>36}: {gib(f'memory/{key}_bytes_per_device')}")
  used = report["memory/peak_bytes_per_device"]
  verdict = "fits" if report["fits"] else "DOES NOT FIT"
  lines.append(f"  per chip peak HBM: {used / 2**30:.2f} of {hbm / 2**30:.1f} GiB "
               f"({100 * used / hbm:.1f}%): {verdict}, {100 * (1 - used / hbm):.1f}% spare")
  lines.append(f"  step time at {100 * report['mfu']:.0f}% MFU: {report['step_seconds']:.2f} s "
               f"({report['chips']} chips x {report['tpu/peak_flops'] / 1e12:.0f} TFLOP/s peak "
               f"bf16)")
  return lines


def dry_run(config, devices=None, topology: str | None = None,
            mfu: float = DEFAULT_MFU) -> dict[str, Any]:
  """Returns (and logs) parameter counts, model FLOPs per step and compiled per-device memory,
  and the backend they were compiled for (`report["backend"]`: "cpu", "tpu", "gpu").

  With `topology` (a Cloud TPU name, e.g. "v5p-32") the step is compiled for that slice with
  libtpu's compile-only client; the report adds per-chip HBM use (`memory/peak_bytes_per_device`
  of `tpu/hbm_bytes`), whether it fits (`fits`) and the step time at `mfu`.
  """
  report: dict[str, Any] = {}
  tpu_slice = None
  if topology:
    tpu_slice = tpu.parse_slice(topology)
    check_topology_mesh(config, tpu_slice)
    try:
      devices = tpu.compile_only_devices(tpu_slice)
    except tpu.LibtpuMissing as e:
      report["fallback"] = (f"No TPU compile for {tpu_slice.name}: {e}\nFalling back to the CPU "
                            "compile (its memory figures are CPU-backend figures).")
      log.warning("%s", report["fallback"])
      tpu_slice = None
    else:
      # Executables compiled for compile-only devices cannot be read back from the persistent
      # compilation cache; keep this process from writing them there.
      jax.config.update("jax_enable_compilation_cache", False)
  exp = build_experiment(config, devices=devices)
  counts = {name: int(sum(np.prod(x.shape) for x in jax.tree.leaves(sub)))
            for name, sub in exp.abstract_state.params.items()}
  report.update({"params/" + k: v for k, v in counts.items()})
  report["params/total"] = sum(counts.values())
  report.update({"backend": exp.mesh.devices.flat[0].platform, "mesh": dict(exp.mesh.shape),
                 "batch_size": config.batch_size, "microbatches": config.microbatches})
  report["flops_per_step"] = model_flops(config, exp.tokenizer)
  t0 = time.time()
  with exp.context():
    lowered = exp.train_step.lower(*abstract_inputs(exp))
    try:
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      if tpu_slice is None or "RESOURCE_EXHAUSTED" not in str(e):
        raise
      compiled, error = None, str(e)
  report["compile_seconds"] = time.time() - t0
  if tpu_slice is not None:
    report.update(_tpu_report(exp, tpu_slice, mfu, report["flops_per_step"]))
    if compiled is None:
      report["compile_error"] = " ".join(error.split())[:600]
      needed = _needed_bytes(error)
      if needed:
        report["memory/needed_bytes_per_device"] = needed
  if compiled is not None:
    report.update(_memory_report(compiled))
  if tpu_slice is not None:  # None: XLA could not place the step at all
    report["fits"] = (None if compiled is None
                      else report["memory/peak_bytes_per_device"] <= tpu_slice.hbm_bytes)
  log.info(format_report(report, config.family))
  return report


def _tpu_report(exp: Experiment, tpu_slice: tpu.TpuSlice, mfu: float,
                flops: float) -> dict[str, Any]:
  state = exp.abstract_state
  return {
      "topology": tpu_slice.name, "chips": tpu_slice.chips, "tpu/hbm_bytes": tpu_slice.hbm_bytes,
      "tpu/peak_flops": tpu_slice.peak_flops, "mfu": mfu,
      "offload": bool(exp.config.optim.offload),
      "memory/param_bytes_per_device": _shard_bytes(state.params, exp.shardings.params),
      "memory/optimizer_bytes_per_device": _shard_bytes(state.opt_state, exp.shardings.opt_state),
      "step_seconds": flops / (tpu_slice.chips * tpu_slice.peak_flops * mfu),
  }
