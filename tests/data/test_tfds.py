"""TFDS source: a tiny array_record dataset prepared in tmp (no network, no TensorFlow), read
through make_source: images, captions, labels, bad records counted exactly, config errors."""
import pickle
import sys

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from tests.tfds_helpers import build_dataset, encode
from vljax.data.batching import SKIPPED, SKIPPED_KEYS, BadRecordCounter, SkipBadAndBatch
from vljax.data.pipeline import data_config, make_source, train_iterator
from vljax.data.shapes import ShapesWorld
from vljax.data.tfds import TfdsSource, import_tfds
from vljax.data.tokenizer import shapes_tokenizer

NAME = "vljax_tiny_captions"
RED = (200, 30, 40)
LABELS = ["red", "gray", "palette_blue", "white", "green_stripes"]


def _palette_png() -> bytes:
  """A 12x12 "P" image whose every pixel is palette entry 3 = (0, 128, 255)."""
  image = Image.new("P", (12, 12), 3)
  image.putpalette([0, 0, 0] * 3 + [0, 128, 255] + [0, 0, 0] * 252)
  return encode(image)


def _wide_png() -> bytes:
  """40x20: 10 red columns, 20 green, 10 blue; the centre crop is all green."""
  pixels = np.zeros((20, 40, 3), np.uint8)
  pixels[:, :10], pixels[:, 10:30], pixels[:, 30:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
  return encode(pixels)


def _truncated_jpeg() -> bytes:
  noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
  data = encode(noise, "JPEG", quality=95)
  return data[:len(data) // 2]


def _record(image: bytes, captions: list[str], label: int, thumb: int = 0) -> dict:
  return {"image": image, "captions": {"text": captions}, "label": label,
          "thumb": np.full((4, 6, 3), thumb, np.uint8)}


# index: (record, expected caption or the bad record's error)
RECORDS = [
    (_record(encode(Image.new("RGB", (40, 30), RED), "JPEG", quality=95),
             ["a red picture", "a crimson picture"], 0, thumb=9), "a red picture"),
    (_record(encode(Image.new("L", (20, 20), 77)), ["a gray square"], 1), "a gray square"),
    (_record(_truncated_jpeg(), ["cut short"], 0), "cannot decode image"),
    (_record(_palette_png(), [" ", "a palette image"], 2), "a palette image"),
    (_record(encode(Image.new("RGB", (8, 8), RED)), ["", "  "], 0), "missing or empty caption"),
    (_record(encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0))), ["a transparent image"], 3),
     "a transparent image"),
    (_record(encode(Image.fromarray(np.full((8, 8), 40000, np.uint16))), ["sixteen bits"], 0),
     "unsupported image mode 'I;16'"),
    (_record(encode(Image.new("RGB", (8, 8), RED)), [], 0), "missing or empty caption"),
    (_record(np.random.default_rng(1).bytes(300), ["not an image"], 0), "cannot decode image"),
    # Record 9 of two captions takes caption 9 % 2 = 1.
    (_record(_wide_png(), ["stripes one", "stripes two"], 4), "stripes two"),
]
GOOD = {0: (RED, 6), 1: ((77, 77, 77), 0), 3: ((0, 128, 255), 0), 5: ((255, 255, 255), 0),
        9: ((0, 255, 0), 2)}  # index: (colour, tolerance)
BAD = sorted(set(range(len(RECORDS))) - set(GOOD))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tfds")
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "captions": tfds.features.Sequence({"text": tfds.features.Text()}),
      "label": tfds.features.ClassLabel(names=LABELS),
      "thumb": tfds.features.Tensor(shape=(4, 6, 3), dtype=np.uint8),
  })
  build_dataset(directory, NAME, features, {"train": [r for r, _ in RECORDS]})
  return str(directory)


def _cfg(data_dir, **kw):
  tfds = dict(name=NAME, data_dir=data_dir, label_key="label")
  tfds.update({k[len("tfds_"):]: v for k, v in kw.items() if k.startswith("tfds_")})
  kw = {k: v for k, v in kw.items() if not k.startswith("tfds_")}
  return data_config({**dict(source="tfds", tfds=tfds, image_size=16, max_text_len=16), **kw})


def _key(index: int) -> str:
  return f"{NAME}/train[{index}]"


def test_make_source_reads_images_captions_labels(data_dir):
  source = make_source(_cfg(data_dir), "train")
  assert isinstance(source, TfdsSource) and len(source) == len(RECORDS)
  assert source.label_names == LABELS
  for index, (colour, tolerance) in GOOD.items():
    example = source[index]
    assert set(example) == {"image", "caption", "label", "key"}, example
    assert example["caption"] == RECORDS[index][1]
    assert example["label"] == RECORDS[index][0]["label"]
    assert example["key"] == _key(index)
    image = example["image"]
    assert image.dtype == np.uint8 and image.shape == (16, 16, 3)
    # Centre-square crop before the resize: the wide image's red and blue columns never show.
    np.testing.assert_allclose(image[:, 1:-1].reshape(-1, 3),
                               np.broadcast_to(colour, (16 * 14, 3)), atol=tolerance)
  with pytest.raises(IndexError):
    source[len(RECORDS)]


def test_bad_records_return_errors(data_dir):
  source = make_source(_cfg(data_dir), "train")
  for index in BAD:
    example = source[index]
    assert set(example) == {"error", "key"}, example
    assert RECORDS[index][1] in example["error"], (index, example["error"])
    assert example["key"] == _key(index)


def test_bad_records_are_skipped_and_counted_exactly(data_dir):
  source = make_source(_cfg(data_dir), "train")
  ds = grain.MapDataset.source(source).to_iter_dataset()
  batches = list(SkipBadAndBatch(ds, 2, drop_remainder=False, keep_strings=True, max_keys=10))
  assert [b["caption"] for b in batches] == [[RECORDS[i][1] for i in sorted(GOOD)][j:j + 2]
                                              for j in (0, 2, 4)]
  assert sum(int(b[SKIPPED]) for b in batches) == len(BAD)
  assert [k for b in batches for k in b[SKIPPED_KEYS]] == [_key(i) for i in BAD]


def test_train_iterator_batches_and_counts_bad_records(data_dir):
  it = train_iterator(_cfg(data_dir), shapes_tokenizer(), seed=0, global_batch_size=4)
  counter = BadRecordCounter(max_bad_fraction=0.6, min_records=1)
  for _ in range(6):  # 24 good records: every epoch's 5 bad ones are met at least twice
    batch = counter.observe(next(it))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape == (4, 16) and batch["text"].dtype == np.int32
    assert set(batch["label"].tolist()) <= {RECORDS[i][0]["label"] for i in GOOD}
  assert counter.distinct_bad_keys == {_key(i) for i in BAD}
  assert counter.bad / counter.total == pytest.approx(0.5, abs=0.15)


def test_array_images_other_keys_and_pickling(data_dir):
  source = TfdsSource(NAME, data_dir=data_dir, image_key="thumb", caption_key=None)
  example = source[0]
  assert set(example) == {"image", "key"}
  np.testing.assert_array_equal(example["image"], np.full((4, 6, 3), 9, np.uint8))
  assert source[4]["image"].shape == (4, 6, 3)  # its caption is not read, so it is good here
  resized = TfdsSource(NAME, data_dir=data_dir, image_key="thumb", image_size=2)[0]["image"]
  np.testing.assert_array_equal(resized, np.full((2, 2, 3), 9, np.uint8))
  copy = pickle.loads(pickle.dumps(make_source(_cfg(data_dir), "train")))
  assert copy[9]["caption"] == "stripes two"
  assert copy[2]["error"].startswith("cannot decode image")


def test_validation_comes_from_the_shapes_world(data_dir):
  assert isinstance(make_source(_cfg(data_dir), "validation"), ShapesWorld)


def test_config_errors_name_the_field(data_dir):
  with pytest.raises(ValueError, match=r"config\.data\.tfds\.caption_key='captions/txt' is not a "
                     r"feature.*captions/text, image, label, thumb"):
    make_source(_cfg(data_dir, tfds_caption_key="captions/txt"), "train")
  with pytest.raises(ValueError, match=r"config\.data\.tfds\.image_key='label' is a ClassLabel"):
    make_source(_cfg(data_dir, tfds_image_key="label"), "train")
  with pytest.raises(ValueError, match=r"config\.data\.tfds\.label_key='captions/text' is a Text"):
    make_source(_cfg(data_dir, tfds_label_key="captions/text"), "train")
  with pytest.raises(ValueError, match=r"config\.data\.tfds\.caption_key='label' is a ClassLabel"):
    make_source(_cfg(data_dir, tfds_caption_key="label"), "train")
  with pytest.raises(ValueError, match=r"config\.data\.tfds\.name"):
    make_source(_cfg(data_dir, tfds_name=""), "train")
  with pytest.raises(ValueError, match=r"split 'validation'.*train"):
    make_source(_cfg(data_dir, tfds_split="validation"), "train")
  with pytest.raises(FileNotFoundError,
                     match=r"config\.data\.tfds \(name.*tfds build not_prepared --data_dir="):
    make_source(_cfg(data_dir, tfds_name="not_prepared"), "train")
  with pytest.raises(ValueError, match="'shapes', 'webdataset', 'tfds'"):
    make_source(_cfg(data_dir, source="tfrecords"), "train")


def test_missing_package_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(ImportError, match=r"pip install 'vljax\[tfds\]'"):
    import_tfds()
