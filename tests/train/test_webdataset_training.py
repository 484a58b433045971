"""Training on WebDataset shards with corrupt records: the run completes and reports exactly the
number of bad records planted."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from tests.train.helpers import tiny_config
from vljax.data.batching import TooManyBadRecordsError
from vljax.data.shapes import ShapesWorld
from vljax.train.loop import train_and_evaluate


def _encode(array: np.ndarray, fmt: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return buffer.getvalue()


def write_shards(directory, num_good: int = 22, bad: bool = True) -> tuple[str, int]:
  """Two img2dataset-style shards of shapes-world scenes (JPEG and PNG, .txt and .json
  captions) with planted bad records; returns (brace pattern, number of bad records)."""
  world = ShapesWorld("train", image_size=48)
  members = [[], []]
  for i in range(num_good):
    example = world.example(i)
    key = f"{i:06d}"
    fmt, ext = ("JPEG", "jpg") if i % 2 else ("PNG", "png")
    shard = members[i % 2]
    shard.append((f"{key}.{ext}", _encode(example["image"], fmt)))
    if i % 3:
      shard.append((f"{key}.txt", example["caption"].encode()))
    else:
      shard.append((f"{key}.json", json.dumps({"caption": example["caption"], "url": "u"}).encode()))
  planted = []
  if bad:
    jpeg = _encode(world.example(99)["image"], "JPEG")
    planted = [("bad_truncated.jpg", jpeg[:len(jpeg) // 3]), ("bad_truncated.txt", b"a red circle."),
               ("bad_noise.png", np.random.default_rng(0).bytes(500)), ("bad_noise.txt", b"a blue star."),
               ("bad_empty.png", _encode(world.example(98)["image"], "PNG")), ("bad_empty.txt", b"  ")]
    members[0].extend(planted[:4])
    members[1].extend(planted[4:])
  for i, shard in enumerate(members):
    with tarfile.open(os.path.join(directory, f"shard-{i:05d}.tar"), "w") as tar:
      for name, data in shard:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return os.path.join(directory, "shard-{00000..00001}.tar"), len(planted) // 2


def webdataset_config(pattern, **changes):
  """Training on the shards; no evaluation (these tests read the training metrics only)."""
  config = tiny_config(**{"total_steps": 8, "log_every": 4, "checkpoint_every": 4, "evals": {},
                          **changes})
  config.data["source"] = "webdataset"
  config.data["webdataset"] = dict(shards=pattern)
  config.data["min_records_before_check"] = 10_000  # the planted fraction is far above 5%
  return config


def test_training_on_webdataset_skips_and_counts_bad_records(tmp_path):
  pattern, num_bad = write_shards(str(tmp_path))
  workdir = str(tmp_path / "run")
  train_and_evaluate(webdataset_config(pattern), workdir)  # 8 steps x 16 = several epochs
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  last = [r for r in records if "data/bad_records" in r][-1]
  assert last["data/bad_records"] == num_bad == 3
  assert last["data/skipped"] >= num_bad  # counted again in every epoch
  assert os.path.exists(os.path.join(workdir, "metrics.json"))


def test_too_many_bad_records_stop_the_run(tmp_path):
  pattern, _ = write_shards(str(tmp_path), num_good=6)
  config = webdataset_config(pattern)
  config.data["min_records_before_check"] = 20
  with pytest.raises(TooManyBadRecordsError, match="max_bad_fraction"):
    train_and_evaluate(config, str(tmp_path / "run"))


def test_bad_record_counts_survive_a_resume(tmp_path):
  """The counts are checkpointed with the iterator: a run stopped at step 4 and resumed reports
  what the uninterrupted run reports."""
  pattern, num_bad = write_shards(str(tmp_path))
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  train_and_evaluate(webdataset_config(pattern), whole)
  train_and_evaluate(webdataset_config(pattern, total_steps=4), split)
  train_and_evaluate(webdataset_config(pattern), split)  # resumes from step 4

  def counts(workdir):
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return [(r["step"], r["data/skipped"], r["data/bad_records"]) for r in records
            if "data/skipped" in r]

  assert counts(split)[-1] == counts(whole)[-1]
  assert counts(whole)[-1][2] == num_bad and counts(whole)[-1][1] > num_bad
