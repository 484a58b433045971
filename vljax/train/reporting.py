"""Metric writers (stdout, TensorBoard, workdir/metrics.jsonl) and a progress line with ETA."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Mapping

import numpy as np

log = logging.getLogger("vljax")


def setup_logging(level: int = logging.INFO) -> None:
  """Sends the "vljax" logger to stdout with a time stamp (independent of absl's root handler)."""
  if any(getattr(h, "_vljax", False) for h in log.handlers):
    return
  handler = logging.StreamHandler(sys.stdout)
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  handler._vljax = True  # pylint: disable=protected-access
  log.addHandler(handler)
  log.setLevel(level)
  log.propagate = False


def _scalar(value) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Writes scalars to stdout, TensorBoard and one JSON object per line in metrics.jsonl.

  Only process 0 writes (pass `enabled=False` elsewhere). Appends, so a resumed run continues the
  same files.
  """

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
          self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # optional: jsonl and stdout still work
          log.warning("tensorboardX is not installed; TensorBoard logging is off")

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: _scalar(v) for k, v in metrics.items()}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps({"step": int(step), **scalars}) + "\n")
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key.replace("@", "_at_"), value, step)
      self._tb.flush()
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items()))
    log.info("step %d: %s", step, shown)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl; a line cut short by a killed run is skipped."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
      else f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
  """A progress bar with rate and ETA, printed to stderr when `update` is called."""

  def __init__(self, total: int, start: int = 0, enabled: bool = True, width: int = 24):
    self.total, self.start, self.enabled, self.width = total, start, enabled, width
    self.t0 = time.time()

  def line(self, step: int) -> str:
    done = max(step - self.start, 0)
    elapsed = time.time() - self.t0
    rate = done / elapsed if elapsed > 0 else float("nan")
    eta = (self.total - step) / rate if rate and rate > 0 else float("inf")
    filled = int(self.width * step / max(self.total, 1))
    bar = "#" * filled + "." * (self.width - filled)
    return (f"[{bar}] {step}/{self.total} {100 * step / max(self.total, 1):5.1f}% "
            f"{rate:.2f} steps/s elapsed {_format_seconds(elapsed)} ETA {_format_seconds(eta)}")

  def update(self, step: int) -> None:
    if self.enabled:
      print(self.line(step), file=sys.stderr, flush=True)
