r"""Does every paper-sized config fit the TPU slice it names? Real TPU compiles, on a CPU host.

For each config, the training step is compiled ahead of time for `config.tpu.topology` by
libtpu's compile-only client (`vljax.train.dry_run`, as `main.py --dry_run`), and the table gives
the slice, the global batch and its microbatches, the peak HBM per chip of the chip's HBM, the
model TFLOP per step and the step time at 40% MFU. Each config compiles in its own process.

  pip install -e ".[tpu]"
  python experiments/bench_tpu_fit.py                       # the paper configs
  python experiments/bench_tpu_fit.py --configs=coca_base.py --set=config.microbatches=8
  python experiments/bench_tpu_fit.py --levers               # memory levers, on coca_base.py

`--levers` compiles one config (one microbatch of it) with each memory lever changed, so their
effect is read off the same table. A fitting CoCa-Large compile takes several CPU-minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

PAPER_CONFIGS = ("clip_b16.py", "siglip_b16.py", "coca_base.py", "coca_large.py", "coca_giant.py")
SPARE = 0.05  # the HBM fraction each config must leave free
LEVER_CONFIG = "coca_base.py"
# (name, overrides): each changes one lever of LEVER_CONFIG, run at one microbatch per step.
LEVERS = (
    ("as configured", ()),
    ("remat none (save everything)", ("config.model.remat='none'", "config.model.image.remat='none'")),
    ("remat full (save nothing)", ("config.model.remat='full'", "config.model.image.remat='full'")),
    ("full logits (no chunked CE)", ("config.loss.ce_chunk_len=0",)),
    ("bf16 optimizer state", ("config.optim.state_dtype='bfloat16'",)),
    ("optimizer state offloaded", ("config.optim.offload=True",)),
)


def run_one(config_name: str, overrides: list[str], out: str) -> None:
  """In a child process: dry-run one config for its slice, write the report as JSON."""
  import logging  # pylint: disable=import-outside-toplevel
  from vljax.train.config import apply_overrides, load_config, validate  # pylint: disable=import-outside-toplevel
  from vljax.train.dry_run import dry_run  # pylint: disable=import-outside-toplevel
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  config = load_config(config_name)
  apply_overrides(config, [o.removeprefix("config.") for o in overrides])
  validate(config)
  if not config.tpu.topology:
    raise SystemExit(f"{config_name} names no TPU slice (config.tpu.topology)")
  report = dry_run(config, topology=config.tpu.topology)
  with open(out, "w") as f:
    json.dump(report, f)


def measure(config_name: str, overrides: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "report.json")
    cmd = [sys.executable, os.path.abspath(__file__), f"--one={config_name}", f"--out={out}"]
    cmd += [f"--set={o}" for o in overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True)
    if proc.returncode or not os.path.exists(out):
      return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"],
              "seconds": time.time() - t0}
    with open(out) as f:
      report = json.load(f)
  report["seconds"] = time.time() - t0
  return report


def row(name: str, r: dict) -> str:
  if "error" in r:
    return f"| {name} | error: {r['error'][0][:120]} |"
  hbm = r["tpu/hbm_bytes"] / 2**30
  if r.get("fits") is None:
    used = f"does not fit ({r.get('memory/needed_bytes_per_device', 0) / 2**30:.1f} GiB needed)"
  else:
    peak = r["memory/peak_bytes_per_device"] / 2**30
    used = f"{peak:.1f} of {hbm:.0f} GiB ({100 * (1 - peak / hbm):.0f}% spare)"
  return (f"| {name} | {r['topology']} ({r['chips']} chips) | {r['batch_size']:,} | "
          f"{r['microbatches']} | {used} | {r['flops_per_step'] / 1e12:,.0f} | "
          f"{r['step_seconds']:.1f} s | {r['seconds'] / 60:.1f} |")


HEADER = ("| config | slice | global batch | microbatches | peak HBM per chip | TFLOP per step | "
          "step at 40% MFU | compile (CPU min) |\n|---|---|---|---|---|---|---|---|")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--configs", default=",".join(PAPER_CONFIGS))
  parser.add_argument("--set", action="append", default=[], help="config.path=value override")
  parser.add_argument("--levers", action="store_true")
  parser.add_argument("--json", help="also write every report to this file")
  parser.add_argument("--one", help=argparse.SUPPRESS)
  parser.add_argument("--out", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    run_one(args.one, args.set, args.out)
    return
  from vljax.train.tpu import libtpu_available  # pylint: disable=import-outside-toplevel
  if not libtpu_available():
    raise SystemExit('libtpu is not installed: pip install -e ".[tpu]"')
  if args.levers:
    runs = [(f"{LEVER_CONFIG} {name}", LEVER_CONFIG, ["config.microbatches=1",
                                                      "config.batch_size=4096", *sets])
            for name, sets in LEVERS]
  else:
    runs = [(name, name, args.set) for name in args.configs.split(",")]
  print(HEADER, flush=True)
  reports, failed = {}, []
  for label, config_name, overrides in runs:
    reports[label] = r = measure(config_name, overrides)
    print(row(label, r), flush=True)
    peak = r.get("memory/peak_bytes_per_device")
    if not args.levers and (peak is None or r.get("fits") is not True
                            or peak > (1 - SPARE) * r["tpu/hbm_bytes"]):
      failed.append(label)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(reports, f, indent=1)
  if failed:
    raise SystemExit(f"not within {100 * (1 - SPARE):.0f}% of their slice's HBM: {', '.join(failed)}")


if __name__ == "__main__":
  main()
