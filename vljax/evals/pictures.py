"""The pictures a run leaves in its workdir: `curves.png` (training and evaluation metrics over
steps, one small panel per metric group) and `samples.png` (validation images, each with lines of
text under it)."""
from __future__ import annotations

import math
import re
import textwrap
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

# Scalars that are bookkeeping rather than learning curves.
_NOT_CURVES = frozenset({"step", "train/steps_per_sec", "train/cap_tokens", "train/pos_logit",
                         "train/neg_logit", "eval/seconds"})
# train/* scalars shown alone, in this order, after the loss and batch accuracy.
_TRAIN_SINGLES = {"lr": "learning rate", "grad_norm": "gradient norm",
                  "t": "temperature t (logit scale)", "b": "bias b"}
# Series whose ranges differ by more than this factor go to separate panels, except the parts
# of the training loss, which are read against their (weighted) sum.
RANGE_RATIO = 5.0
_NEVER_SPLIT = frozenset({"training loss"})


def _group(key: str) -> tuple[tuple, str] | None:
  """(sort key, panel title) of the group a metric belongs to, None for a metric not drawn."""
  prefix, _, name = key.partition("/")
  if key in _NOT_CURVES or (prefix.startswith("zeroshot_") and name in ("images", "skipped")):
    return None
  if prefix == "train":
    if name == "loss" or name.endswith("_loss"):
      return (0,), "training loss"
    if "accuracy" in name:
      return (1,), "training batch accuracy"
    if name in _TRAIN_SINGLES:
      return (2, list(_TRAIN_SINGLES).index(name)), _TRAIN_SINGLES[name]
    return (3,), "train"
  if prefix in ("zeroshot", "zeroshot_held_out"):
    return (4,), "zero-shot (validation scenes)"
  if prefix.startswith("zeroshot_"):  # a TFDS zero-shot evaluator: zeroshot_<name>/top1, /top5
    return (5, prefix), f"zero-shot {prefix[len('zeroshot_'):]}"
  if prefix == "retrieval":
    return (6,), "retrieval R@k"
  if prefix == "captioning":
    if name.startswith("bleu"):
      return (7,), "captioning BLEU"
    if name.startswith("cider"):  # 0..10, not 0..1 like BLEU
      return (8,), "captioning CIDEr"
    return (9,), "captioning"
  if prefix == "data":  # counts of skipped input records; drawn only when some are non-zero
    return (10,), "skipped input records"
  return (11, prefix), prefix


def _series(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of `key`'s finite values, in record order."""
  points = [(r["step"], r[key]) for r in records if _is_number(r.get(key))]
  points = [(s, float(v)) for s, v in points if math.isfinite(v)]
  if not points:
    return np.zeros(0), np.zeros(0)
  steps, values = zip(*points)
  return np.asarray(steps, dtype=float), np.asarray(values)


def _is_number(value) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _scale(values: np.ndarray) -> float:
  """The size of a series' range: fractions in [0, 1] count as 1 (accuracies share an axis
  even when one is near 0), anything else as its largest magnitude."""
  if np.all((values >= 0) & (values <= 1)):
    return 1.0
  return max(float(np.max(np.abs(values))), 1e-30)


def _natural(key: str) -> list:
  """Sorts bleu2 before bleu10 and r@5 before r@10."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def metric_panels(records: Sequence[dict]) -> list[tuple[str, list[str]]]:
  """The panels of `curves.png` as (title, metric keys), in display order.

  Metrics are grouped by the name before "/" (with finer groups for training loss, learning
  rate, gradient norm, temperature and bias, BLEU and CIDEr), and a group whose series' ranges
  differ by more than `RANGE_RATIO` is split into panels "title (1/2)", "title (2/2)" (the
  training loss and its parts stay together). Records
  without a step, non-numeric and non-finite values are ignored; data/* counts appear only when
  some are non-zero.
  """
  records = [r for r in records if isinstance(r, dict) and _is_number(r.get("step"))]
  groups: dict[str, tuple[tuple, list[tuple[float, str]]]] = {}
  keys = sorted({k for r in records for k, v in r.items() if _is_number(v)}, key=_natural)
  for key in keys:
    group = _group(key)
    if group is None:
      continue
    _, values = _series(records, key)
    if not values.size or (key.startswith("data/") and not np.any(values)):
      continue
    order, title = group
    groups.setdefault(title, (order, []))[1].append((_scale(values), key))
  panels = []
  for title, (_, members) in sorted(groups.items(), key=lambda item: (item[1][0], item[0])):
    parts: list[list[tuple[float, str]]] = []
    for scale, key in sorted(members):
      if parts and (title in _NEVER_SPLIT or scale <= RANGE_RATIO * parts[-1][0][0]):
        parts[-1].append((scale, key))
      else:
        parts.append([(scale, key)])
    for i, part in enumerate(parts):
      name = title if len(parts) == 1 else f"{title} ({i + 1}/{len(parts)})"
      panels.append((name, sorted((key for _, key in part), key=_natural)))
  return panels


def _grid_shape(count: int) -> tuple[int, int]:
  """(rows, columns) for `count` panels: 1-2 in a row, up to 4 columns beyond that."""
  cols = count if count <= 2 else 2 if count <= 4 else 3 if count <= 9 else 4
  return -(-count // cols), cols


def plot_curves(records: Sequence[dict], path: str) -> list[str]:
  """Draws `metric_panels(records)` against step into `path`, one small panel each; returns
  the panel titles. With nothing to draw, the picture says so."""
  panels = metric_panels(records)
  records = [r for r in records if isinstance(r, dict) and _is_number(r.get("step"))]
  rows, cols = _grid_shape(max(len(panels), 1))
  fig, axes = plt.subplots(rows, cols, figsize=(3.7 * cols, 2.8 * rows), squeeze=False,
                           layout="constrained")
  for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
  if not panels:
    axes[0, 0].text(0.5, 0.5, "no metrics recorded yet", ha="center", va="center")
  for ax, (title, keys) in zip(axes.ravel(), panels):
    # Legend labels without the prefix that every key of the panel shares ("retrieval/").
    prefixes = {key.partition("/")[0] for key in keys}
    labels = [key.partition("/")[2] for key in keys] if len(prefixes) == 1 else keys
    for key, label in zip(keys, labels):
      steps, values = _series(records, key)
      # Markers when points are few (evaluations, short runs), so a single one shows.
      ax.plot(steps, values, marker="o" if len(steps) <= 30 else None, markersize=3,
              linewidth=1.2, label=label)
    if len(keys) == 1:
      ax.set_ylabel(keys[0], fontsize=7)
    else:
      # Below the axes, clear of the data and of the neighbouring panels.
      ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False,
                ncol=min(len(keys), 2 if max(map(len, labels)) > 14 else 3), handlelength=1.5,
                columnspacing=1.0)
    ax.set_title(title, fontsize=8.5)
    ax.tick_params(labelsize=7)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useMathText=True)
    ax.yaxis.get_offset_text().set_fontsize(7)
    ax.grid(alpha=0.3)
  fig.supxlabel("step", fontsize=8)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return [title for title, _ in panels]


def plot_samples(images: np.ndarray, lines: Sequence[Sequence[str]], path: str, cols: int = 4,
                 wrap: int = 46) -> None:
  """A grid of uint8 images, each titled by its lines (e.g. generated / reference captions).
  Empty images ([N, 0, 0, 3]: a language model's completions) give rows of text only."""
  if len(images) != len(lines):
    raise ValueError(f"{len(images)} images but {len(lines)} line groups")
  rows = -(-len(images) // cols)
  text_lines = max((sum(len(textwrap.wrap(t, wrap)) for t in text) for text in lines), default=1)
  title_inches = 0.14 * text_lines  # room above each image for its wrapped lines
  if not any(np.size(image) for image in images):  # text only: each panel holds its lines
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, (title_inches + 0.2) * rows),
                             squeeze=False, gridspec_kw={"hspace": 0.1, "wspace": 0.05})
    for ax in axes.ravel():
      ax.axis("off")
    for ax, text in zip(axes.ravel(), lines):
      ax.text(0, 1, "\n".join(textwrap.fill(t, wrap) for t in text), fontsize=6.5, va="top",
              ha="left", transform=ax.transAxes)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return
  fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, (3.2 + title_inches) * rows),
                           squeeze=False, gridspec_kw={"hspace": title_inches / 3.2 + 0.1})
  for ax in axes.ravel():
    ax.axis("off")
  for ax, image, text in zip(axes.ravel(), images, lines):
    if np.size(image):
      ax.imshow(image, interpolation="nearest")
    ax.set_title("\n".join(textwrap.fill(t, wrap) for t in text), fontsize=6.5, loc="left")
  fig.savefig(path, dpi=100)
  plt.close(fig)
