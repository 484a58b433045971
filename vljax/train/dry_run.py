"""`--dry_run`: what a config would cost, without allocating anything on a device.

Prints the parameter count of each tower, the FLOPs of one training step, and the compiled
per-device memory of the step for the configured mesh and batch (from XLA's
`memory_analysis()`), then returns. Parameters, optimizer state and the batch exist only as
shapes with shardings.
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
           for k, v in exp.family.batch_spec(exp.data_cfg, exp.config.batch_size).items()}
  return state, batch


def dry_run(config, devices=None) -> dict[str, Any]:
  """Returns (and logs) parameter counts, FLOPs per step and compiled per-device memory."""
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
  lines = [f"Dry run of {config.model.get('name')} on mesh {report['mesh']}, global batch {config.batch_size}:"]
  lines += [f"  parameters {k[7:]:>10}: {v / 1e6:10.1f}M" for k, v in report.items() if k.startswith("params/")]
  lines.append(f"  FLOPs per step (whole mesh): {flops / 1e12:.2f} TFLOP")
  for key in ("argument", "output", "temp", "alias", "total"):
    lines.append(f"  per-device memory {key:>9}: {report[f'memory/{key}_bytes_per_device'] / 2**30:8.2f} GiB")
  log.info("\n".join(lines))
  return report
