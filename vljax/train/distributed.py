"""Starting JAX's multi-controller runtime (one process per host) from the config or environment.

- `config.distributed.mode = "auto"`: `jax.distributed.initialize()` detects the cluster itself
  (Cloud TPU pods and slices, SLURM, ...). This is what `tpu/vljax-tpu.sh launch` uses.
- `"explicit"`: coordinator address, process count and id from `config.distributed`.
- The environment variables VLJAX_COORDINATOR_ADDRESS, VLJAX_NUM_PROCESSES and VLJAX_PROCESS_ID,
  when set, select "explicit" with their values (handy for one launcher per process).
- `"off"` (default): a single process.
On CPU hosts the collectives between processes run over gloo.
"""
from __future__ import annotations

import logging
import os

import jax
import ml_collections

log = logging.getLogger("vljax")

ENV_KEYS = ("VLJAX_COORDINATOR_ADDRESS", "VLJAX_NUM_PROCESSES", "VLJAX_PROCESS_ID")


def distributed_settings(config: ml_collections.ConfigDict) -> dict:
  """The mode and arguments to start with: the environment overrides the config."""
  cfg = config.distributed
  if all(k in os.environ for k in ENV_KEYS):
    return dict(mode="explicit", coordinator_address=os.environ["VLJAX_COORDINATOR_ADDRESS"],
                num_processes=int(os.environ["VLJAX_NUM_PROCESSES"]),
                process_id=int(os.environ["VLJAX_PROCESS_ID"]))
  missing = [k for k in ENV_KEYS if k not in os.environ]
  if len(missing) < len(ENV_KEYS):
    raise ValueError(f"set all of {', '.join(ENV_KEYS)} or none; missing {', '.join(missing)}")
  if cfg.mode not in ("off", "auto", "explicit"):
    raise ValueError(f"config.distributed.mode={cfg.mode!r}; choose off, auto or explicit")
  return dict(mode=cfg.mode, coordinator_address=cfg.coordinator_address,
              num_processes=cfg.num_processes, process_id=cfg.process_id)


def initialize(config: ml_collections.ConfigDict) -> None:
  """Starts the multi-controller runtime if the config or environment asks for it."""
  settings = distributed_settings(config)
  if settings["mode"] == "off":
    return
  if config.distributed.cpu_collectives:
    jax.config.update("jax_cpu_collectives_implementation", config.distributed.cpu_collectives)
  if settings["mode"] == "auto":
    jax.distributed.initialize()
  else:
    if not settings["coordinator_address"] or settings["num_processes"] < 1:
      raise ValueError("explicit distributed mode needs coordinator_address and num_processes")
    jax.distributed.initialize(settings["coordinator_address"], settings["num_processes"],
                               settings["process_id"])
  log.info("Process %d of %d; %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
