"""Tiny configs and batches shared by the training tests."""
import os

import numpy as np

from vljax.train.config import base_config


def xla_flags(devices: int | None = None) -> str:
  """XLA_FLAGS for a test's subprocess: `devices` fake CPU devices (None: XLA's one) and the
  test run's fast-compile flags (tests/conftest.py)."""
  flags = os.environ.get("VLJAX_TEST_XLA_FLAGS", "")
  if devices is not None:
    flags = f"--xla_force_host_platform_device_count={devices} {flags}"
  return flags.strip()


def small_evals(zeroshot: int = 48, retrieval: int = 40, captioning: int = 0, batch_size: int = 16):
  """config.evals with small zero-shot / retrieval (/ captioning) sets."""
  evals = dict(zeroshot=dict(type="zeroshot", images=zeroshot, batch_size=batch_size),
               retrieval=dict(type="retrieval", pairs=retrieval, batch_size=batch_size))
  if captioning:
    evals["captioning"] = dict(type="captioning", images=captioning, batch_size=batch_size)
  return evals


def tiny_config(loss: str = "softmax", **changes):
  """A two-tower config small enough to compile and step in seconds on the CPU."""
  c = base_config()
  c.total_steps = 6
  c.batch_size = 16
  c.log_every = 2
  c.eval_every = 0
  c.checkpoint_every = 3
  c.model = dict(
      image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8),
      text=dict(width=32, depth=1, mlp_dim=64, num_heads=2),
      embed_dim=16)
  c.loss.contrastive = loss
  c.data = dict(image_size=32, max_text_len=16)
  c.evals = small_evals()
  c.optim.warmup_steps = 2
  for key, value in changes.items():
    target = c
    *path, last = key.split(".")
    for p in path:
      target = target[p]
    target[last] = value
  c.optim.warmup_steps = min(c.optim.warmup_steps, c.total_steps)
  return c


def random_batch(config, seed=0, vocab=50):
  rng = np.random.default_rng(seed)
  b, s, l = config.batch_size, config.data["image_size"], config.data["max_text_len"]
  tokens = rng.integers(4, vocab, size=(b, l)).astype(np.int32)
  tokens[:, -3:] = 0  # padding
  tokens[:, -4] = 3  # eos
  return {"image": rng.integers(0, 256, size=(b, s, s, 3)).astype(np.uint8), "text": tokens,
          "mask_ar": np.ones_like(tokens), "mask_loss": (tokens != 0).astype(np.int32),
          "label": np.full((b,), -1, np.int32)}
