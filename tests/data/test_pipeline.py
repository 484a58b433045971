"""Tests of the grain input pipeline: batches, determinism and sibling groups on the shapes world;
sources that cannot give a batch stop with an error that says why."""
import contextlib
import io
import signal

import numpy as np
import pytest
from PIL import Image

from tests.data.test_webdataset import write_tar
from vljax.data import pipeline, shapes
from vljax.data.batching import TooManyBadRecordsError
from vljax.data.pipeline import data_config, train_iterator
from vljax.data.tokenizer import shapes_tokenizer
from vljax.data.webdataset import WebDatasetSource


def _png() -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (8, 8), (200, 30, 40)).save(buffer, "PNG")
  return buffer.getvalue()


def _batches(count, shape_siblings=0, **data):
  cfg = data_config(dict(image_size=24, max_text_len=40, shapes=dict(shape_siblings=shape_siblings),
                         **data))
  it = train_iterator(cfg, shapes_tokenizer(), seed=1, global_batch_size=8)
  return [next(it) for _ in range(count)]


def test_batches_are_deterministic_and_well_formed():
  first, second = _batches(2), _batches(2)
  for a, b in zip(first, second):
    assert a["image"].shape == (8, 24, 24, 3) and a["image"].dtype == np.uint8
    assert a["text"].shape == (8, 40) and a["text"].dtype == np.int32
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["text"], b["text"])


def test_sibling_groups_are_adjacent_and_differ_only_in_shape_words():
  tokenizer = shapes_tokenizer()
  (batch,) = _batches(1, shape_siblings=3)
  texts = tokenizer.decode(batch["text"])
  assert len(texts) == 8 and len(set(texts)) == 8
  for start in (0, 4):  # two groups of a scene and its 3 siblings
    group = [t.split() for t in texts[start:start + 4]]
    assert all(len(words) == len(group[0]) for words in group)
    differing = {i for words in group[1:] for i, (a, b) in enumerate(zip(group[0], words))
                 if a != b}
    assert differing and all(group[0][i].strip(".,") in shapes.SHAPES for i in differing)
  with pytest.raises(ValueError, match="divisible by 3"):
    _batches(1, shape_siblings=2)


@contextlib.contextmanager
def _deadline(seconds: int):
  """Fails the test, instead of hanging CI, if its body runs longer than `seconds`."""
  def fail(signum, frame):
    raise TimeoutError(f"Still running after {seconds}s: the input pipeline hangs")
  previous = signal.signal(signal.SIGALRM, fail)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


UNUSABLE = {  # a shard with no usable record, its config changes, what the error must say
    "corrupt_jpegs": ([(f"{i}.jpg", b"\xff\xd8 not really a jpeg") for i in range(5)]
                      + [(f"{i}.txt", b"a caption") for i in range(5)], {},
                      r"20 x cannot decode image .* — check the images in config\.data\.webdataset\.shards"),
    "captions_without_images": ([(f"{i}.txt", b"a caption") for i in range(5)], {},
                                r"20 x no image member \(has: txt\) — check config\.data\.webdataset\.shards"),
    "wrong_caption_key": ([(f"{i}.png", _png()) for i in range(5)]
                          + [(f"{i}.txt", b"a caption") for i in range(5)],
                          dict(caption_keys=("caption",)),
                          r"20 x missing or empty caption \(looked in \.caption\) — check "
                          r"config\.data\.webdataset\.caption_keys / json_caption_field / shards"),
}


@pytest.mark.parametrize("case", sorted(UNUSABLE))
def test_a_source_without_usable_records_stops_within_min_records(case, tmp_path, monkeypatch):
  members, changes, reason = UNUSABLE[case]
  write_tar(tmp_path / "shard.tar", members)
  reads = []
  read = WebDatasetSource.__getitem__
  monkeypatch.setattr(WebDatasetSource, "__getitem__",
                      lambda self, i: reads.append(i) or read(self, i))
  cfg = data_config(dict(source="webdataset", image_size=8, min_records_before_check=20,
                         webdataset=dict(shards=str(tmp_path / "shard.tar"), **changes)))
  with _deadline(60):
    it = train_iterator(cfg, shapes_tokenizer(), seed=0, global_batch_size=4)
    with pytest.raises(TooManyBadRecordsError,
                       match=r"^20 of 20 input records read \(100\.00%\) were unusable, more than "
                       rf"max_bad_fraction=5\.00% allows: {reason}.*config\.data\.max_bad_fraction "
                       "and min_records_before_check"):
      next(it)
  assert len(reads) == 20


def test_an_empty_source_is_an_error(monkeypatch):
  class Empty:
    def __len__(self):
      return 0

    def __getitem__(self, index):
      raise IndexError(index)

    def __repr__(self):
      return "TfdsSource('coco_captions', split='train[:0]', 0 records)"

  monkeypatch.setattr(pipeline, "make_source", lambda cfg, split: Empty())
  with pytest.raises(ValueError, match=r"The training source TfdsSource\('coco_captions', "
                     r"split='train\[:0\]', 0 records\) holds no records: check config\.data"):
    train_iterator(data_config(dict(source="tfds")), shapes_tokenizer(), seed=0,
                   global_batch_size=4)
