"""`--dry_run`: what a config would cost, without allocating anything on a device.

Prints the parameter count of each tower, the FLOPs of one training step, and the compiled
per-device memory of the step for the configured mesh and batch (from XLA's
`memory_analysis()`), then returns. Parameters, optimizer state and the batch exist only as
shapes with shardings. The memory is that of the backend the step was compiled for: on a CPU
host, an upper bound on what a TPU or GPU needs (see `CPU_MEMORY_NOTE`).
"""
from __future__ import annotations

import copy
import logging
from typing import Any

import jax
import numpy as np

from vljax.sharding import batch_sharding
from vljax.train.loop import Experiment, build_experiment

log = logging.getLogger("vljax")

# Measured on coca_large.py (fsdp=16, batch 256 per device): temporaries of 92.9 GiB compiled
# for CPU, 55 GiB with --xla_disable_hlo_passes=while-loop-invariant-code-motion, ~44 GiB
# compiled for real TPUs.
CPU_MEMORY_NOTE = (
    "  These memory figures were compiled for the CPU backend. XLA's CPU backend keeps extra\n"
    "  float32 copies (e.g. of the bfloat16 activations saved for the backward pass) and does not\n"
    "  apply the accelerators' memory optimisations, so the TPU/GPU figure is typically lower:\n"
    "  about 40% lower for CoCa-Large (92.9 GiB of temporaries on CPU, ~55 GiB with the\n"
    "  while-loop-invariant-code-motion pass disabled, ~44 GiB compiled for real TPUs). An\n"
    "  accelerator-exact figure needs compiling for the target (a TPU dry run, --topology, is not\n"
    "  yet available).")


def _unscanned(model_cfg: Any) -> Any:
  """The model config with every `scan` switched off (XLA's cost analysis counts a scanned
  loop body once, so FLOPs are taken from the unrolled program)."""
  if isinstance(model_cfg, dict):
    return {k: (False if k == "scan" else _unscanned(v)) for k, v in model_cfg.items()}
  return model_cfg


def abstract_inputs(exp: Experiment):
  """ShapeDtypeStructs (with shardings) of the state and one global batch."""
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       exp.abstract_state, exp.shardings)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding(exp.mesh, exp.rules, len(v.shape)))
           for k, v in exp.batch_spec.items()}
  return state, batch


def format_report(report: dict[str, Any], model_name: str | None) -> str:
  """The lines `dry_run` logs; memory from a CPU compile is labelled so, with what that means."""
  on_cpu = report["backend"] == "cpu"
  lines = [f"Dry run of {model_name} on mesh {report['mesh']}, global batch "
           f"{report['batch_size']}, compiled for the {report['backend']} backend:"]
  lines += [f"  parameters {k[7:]:>10}: {v / 1e6:10.1f}M" for k, v in report.items()
            if k.startswith("params/")]
  lines.append(f"  FLOPs per step (whole mesh): {report['flops_per_step'] / 1e12:.2f} TFLOP")
  label = "per-device memory (CPU-compiled)" if on_cpu else "per-device memory"
  for key in ("argument", "output", "temp", "alias", "total"):
    lines.append(f"  {label} {key:>9}: "
                 f"{report[f'memory/{key}_bytes_per_device'] / 2**30:8.2f} GiB")
  if on_cpu:
    lines.append(CPU_MEMORY_NOTE)
  return "\n".join(lines)


def dry_run(config, devices=None) -> dict[str, Any]:
  """Returns (and logs) parameter counts, FLOPs per step and compiled per-device memory, and
  the backend they were compiled for (`report["backend"]`: "cpu", "tpu", "gpu")."""
  exp = build_experiment(config, devices=devices)
  counts = {name: int(sum(np.prod(x.shape) for x in jax.tree.leaves(sub)))
            for name, sub in exp.abstract_state.params.items()}
  report: dict[str, Any] = {"params/" + k: v for k, v in counts.items()}
  report["params/total"] = sum(counts.values())
  with exp.context():
    state, batch = abstract_inputs(exp)
    compiled = exp.train_step.lower(state, batch).compile()
    memory = compiled.memory_analysis()
    unrolled_cfg = copy.deepcopy(config)
    unrolled_cfg.model = _unscanned(config.model.to_dict())
    unrolled = build_experiment(unrolled_cfg, devices=devices, tokenizer=exp.tokenizer)
    flops = unrolled.train_step.lower(*abstract_inputs(unrolled)).cost_analysis()["flops"]
  report.update({
      "backend": exp.mesh.devices.flat[0].platform,  # the devices the step was compiled for
      "mesh": dict(exp.mesh.shape),
      "batch_size": config.batch_size,
      "flops_per_step": float(flops),
      "memory/argument_bytes_per_device": int(memory.argument_size_in_bytes),
      "memory/output_bytes_per_device": int(memory.output_size_in_bytes),
      "memory/temp_bytes_per_device": int(memory.temp_size_in_bytes),
      "memory/alias_bytes_per_device": int(memory.alias_size_in_bytes),
  })
  total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
           - memory.alias_size_in_bytes)
  report["memory/total_bytes_per_device"] = int(total)
  log.info(format_report(report, config.family))
  return report
