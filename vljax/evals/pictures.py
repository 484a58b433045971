"""The pictures a run leaves in its workdir: `curves.png` (training loss and evaluation metrics
over steps) and `samples.png` (validation images, each with lines of text under it)."""
from __future__ import annotations

import textwrap
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position


def plot_curves(records: Sequence[dict], path: str) -> None:
  """Training loss (left) and every evaluation metric in [0, 1] or CIDEr (right) against step."""
  train = [r for r in records if "train/loss" in r]
  evals = [r for r in records if "train/loss" not in r]
  fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(11, 4))
  if train:
    ax_loss.plot([r["step"] for r in train], [r["train/loss"] for r in train], color="tab:blue")
  ax_loss.set(title="training loss", xlabel="step", ylabel="loss")
  ax_loss.grid(alpha=0.3)
  keys = sorted({k for r in evals for k in r if k not in ("step",) and not k.startswith("eval/")})
  for key in keys:
    points = [(r["step"], r[key]) for r in evals if key in r]
    ax_eval.plot(*zip(*points), marker="o", label=key)
  ax_eval.set(title="evaluation", xlabel="step")
  ax_eval.grid(alpha=0.3)
  if keys:
    ax_eval.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_samples(images: np.ndarray, lines: Sequence[Sequence[str]], path: str, cols: int = 4,
                 wrap: int = 46) -> None:
  """A grid of uint8 images, each titled by its lines (e.g. generated / reference captions)."""
  if len(images) != len(lines):
    raise ValueError(f"{len(images)} images but {len(lines)} line groups")
  rows = -(-len(images) // cols)
  text_lines = max((sum(len(textwrap.wrap(t, wrap)) for t in text) for text in lines), default=1)
  title_inches = 0.14 * text_lines  # room above each image for its wrapped lines
  fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, (3.2 + title_inches) * rows),
                           squeeze=False, gridspec_kw={"hspace": title_inches / 3.2 + 0.1})
  for ax in axes.ravel():
    ax.axis("off")
  for ax, image, text in zip(axes.ravel(), images, lines):
    ax.imshow(image, interpolation="nearest")
    ax.set_title("\n".join(textwrap.fill(t, wrap) for t in text), fontsize=6.5, loc="left")
  fig.savefig(path, dpi=100)
  plt.close(fig)
