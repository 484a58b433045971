"""curves.png: one small panel per metric group, robust to partial, empty and NaN records."""
import json
import math

import matplotlib.image
import pytest

from vljax.evals.pictures import _grid_shape, metric_panels, plot_curves
from vljax.train.reporting import read_jsonl


def training_records(steps=300, log_every=10, eval_every=100, bad=0):
  """What a CoCa run with skipped input records writes to metrics.jsonl."""
  records = []
  for step in range(log_every, steps + 1, log_every):
    progress = step / steps
    cap = 5.0 * math.exp(-3 * progress) + 1.0
    con = 2.8 * math.exp(-4 * progress) + 0.1
    records.append({
        "step": step, "train/loss": con + 2 * cap, "train/con_loss": con, "train/cap_loss": cap,
        "train/accuracy": min(1.0, progress), "train/accuracy_t2i": min(1.0, 0.9 * progress),
        "train/cap_accuracy": 0.6 * progress, "train/cap_tokens": 640.0,
        "train/pos_logit": 20 * progress, "train/neg_logit": -5 * progress,
        "train/grad_norm": 3.0 * math.exp(-2 * progress) + 0.2,
        "train/lr": 1e-3 * min(1.0, step / 50) * (1 - 0.9 * progress),
        "train/t": 14.3 + 30 * progress, "train/steps_per_sec": 4.2,
        "data/skipped": bad * step // steps, "data/bad_records": bad * step // (2 * steps)})
    if step % eval_every == 0:
      records.append({
          "step": step, "zeroshot/top1": 0.5 * progress, "zeroshot/top5": 0.9 * progress,
          "zeroshot_held_out/top1": 0.3 * progress,
          **{f"retrieval/{d}/r@{k}": progress * k / 12 for d in ("i2t", "t2i") for k in (1, 5, 10)},
          **{f"captioning/bleu{n}": progress / n for n in range(1, 5)},
          "captioning/cider": 3.0 * progress, "eval/seconds": 12.0})
  return records


def test_metric_panels_group_by_prefix_and_range():
  panels = dict(metric_panels(training_records(bad=8)))
  assert list(panels) == [
      "training loss", "training batch accuracy", "learning rate", "gradient norm",
      "temperature t (logit scale)", "zero-shot (validation scenes)", "retrieval R@k",
      "captioning BLEU", "captioning CIDEr", "skipped input records"]
  assert panels["training loss"] == ["train/cap_loss", "train/con_loss", "train/loss"]
  assert panels["zero-shot (validation scenes)"] == [
      "zeroshot/top1", "zeroshot/top5", "zeroshot_held_out/top1"]
  assert panels["retrieval R@k"] == [f"retrieval/{d}/r@{k}" for d in ("i2t", "t2i")
                                     for k in (1, 5, 10)]
  assert panels["captioning BLEU"] == [f"captioning/bleu{n}" for n in range(1, 5)]
  assert panels["captioning CIDEr"] == ["captioning/cider"]
  assert panels["learning rate"] == ["train/lr"]
  assert panels["temperature t (logit scale)"] == ["train/t"]
  drawn = {key for keys in panels.values() for key in keys}
  assert not drawn & {"eval/seconds", "train/steps_per_sec", "train/cap_tokens"}
  # No skipped records: no panel for them.
  assert "skipped input records" not in dict(metric_panels(training_records(bad=0)))


def test_metric_panels_split_a_group_whose_ranges_differ():
  records = [{"step": s, "train/b": -10.0 + s, "extra/small": 0.01 * s, "extra/large": 100.0 * s,
              "extra/fraction": 0.1} for s in (1, 2)]
  assert metric_panels(records) == [
      ("bias b", ["train/b"]),
      ("extra (1/2)", ["extra/fraction", "extra/small"]),
      ("extra (2/2)", ["extra/large"])]


@pytest.mark.parametrize("records, titles", [
    ([], []),
    ([{"step": 1, "train/loss": 2.0}], ["training loss"]),
    ([{"step": 1, "train/loss": float("nan")}, {"step": 2, "train/loss": 1.0},
      {"step": 3, "zeroshot/top1": float("nan")}, {"train/loss": 5.0}, {"step": 4, "note": "x"}],
     ["training loss"]),
    # Metrics that appear only at some steps; a TFDS zero-shot evaluator's image count is not drawn.
    ([{"step": 1, "train/loss": 1.0, "zeroshot_imagenet/top1": 0.1,
       "zeroshot_imagenet/images": 100.0}, {"step": 5, "zeroshot_imagenet/top5": 0.5}],
     ["training loss", "zero-shot imagenet"]),
])
def test_plot_curves_never_crashes(tmp_path, records, titles):
  path = tmp_path / "curves.png"
  assert plot_curves(records, str(path)) == titles
  assert matplotlib.image.imread(path).shape[0] > 100


def test_plot_curves_of_a_run(tmp_path):
  """A realistic metrics.jsonl, written and read back as the training loop does."""
  jsonl = tmp_path / "metrics.jsonl"
  with open(jsonl, "w") as f:
    for record in training_records(bad=8):
      f.write(json.dumps(record) + "\n")
  path = tmp_path / "curves.png"
  titles = plot_curves(read_jsonl(str(jsonl)), str(path))
  assert titles == [title for title, _ in metric_panels(training_records(bad=8))]
  assert len(titles) == 10
  height, width, _ = matplotlib.image.imread(path).shape
  assert (height, width) == (3 * 280, 4 * 370)  # a grid of 3 x 4 small panels at 100 dpi


def test_grid_stays_small_and_wide():
  for count in range(1, 17):
    rows, cols = _grid_shape(count)
    assert rows * cols >= count and rows * cols - count < cols and cols <= 4 and rows <= cols + 1
