"""WebDataset shards: brace expansion, indexing and decoding, bad records, skip-and-batch."""
import io
import json
import logging
import pickle
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from vljax.data.batching import (SKIPPED, SKIPPED_KEYS, SKIPPED_REASONS, BadRecordCounter,
                                 SkipBadAndBatch, TooManyBadRecordsError)
from vljax.data.webdataset import WebDatasetSource, expand_braces, split_member_name

RED = (200, 30, 40)


def write_tar(path, members, mode: str = "w") -> None:
  """A tar at `path` of (member name, bytes) pairs."""
  with tarfile.open(path, mode) as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _encode(image: Image.Image, fmt: str, **kw) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kw)
  return buffer.getvalue()


def _solid(mode, size, colour):
  return Image.new(mode, size, colour)


def _palette_image() -> Image.Image:
  """A 12x12 "P" image whose every pixel is palette entry 3 = (0, 128, 255)."""
  image = Image.new("P", (12, 12), 3)
  image.putpalette([0, 0, 0] * 3 + [0, 128, 255] + [0, 0, 0] * 252)
  return image


def _wide_png() -> bytes:
  """40x20: 10 red columns, 20 green, 10 blue; the centre crop is all green."""
  pixels = np.zeros((20, 40, 3), np.uint8)
  pixels[:, :10] = (255, 0, 0)
  pixels[:, 10:30] = (0, 255, 0)
  pixels[:, 30:] = (0, 0, 255)
  return _encode(Image.fromarray(pixels), "PNG")


def _truncated_jpeg() -> bytes:
  noise = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
  data = _encode(Image.fromarray(noise), "JPEG", quality=95)
  return data[:len(data) // 2]


# Shard contents: (member name, bytes). Keys are the names up to the first dot of the basename.
GOOD = {
    "red": "a red picture",
    "gray": "a gray square",
    "rgba": "an opaque rgba image",
    "palette": "a palette image",
    "clear": "a transparent image",
    "lossless": "a webp image",
    "a/x": "x in directory a",
    "b/x": "x in directory b",
    "wide": "red green blue stripes",
}
BAD = {
    "truncated": "cannot decode image",
    "noise": "cannot decode image",
    "emptycap": "missing or empty caption",
    "noimage": "no image member",
    "deep": "unsupported image mode",
}


def _shards():
  txt = lambda s: s.encode()
  return [
      [("red.jpg", _encode(_solid("RGB", (40, 30), RED), "JPEG", quality=95)),
       ("red.txt", txt(GOOD["red"])),
       ("red.json", json.dumps({"url": "http://x/red.jpg", "caption": "ignored"}).encode()),
       ("red.url", b"http://x/red.jpg"),
       ("truncated.jpg", _truncated_jpeg()), ("truncated.txt", b"cut short"),
       ("gray.png", _encode(_solid("L", (20, 20), 77), "PNG")),
       ("gray.json", json.dumps({"caption": GOOD["gray"], "width": 20}).encode()),
       ("noise.png", np.random.default_rng(1).bytes(300)), ("noise.txt", b"not an image"),
       ("rgba.png", _encode(_solid("RGBA", (16, 24), (10, 20, 30, 255)), "PNG")),
       ("rgba.txt", txt(GOOD["rgba"]))],
      [("palette.png", _encode(_palette_image(), "PNG")),
       ("palette.txt", txt(GOOD["palette"])),
       ("emptycap.png", _encode(_solid("RGB", (8, 8), RED), "PNG")), ("emptycap.txt", b" \n"),
       ("clear.png", _encode(_solid("RGBA", (8, 8), (0, 0, 0, 0)), "PNG")),
       ("clear.txt", txt(GOOD["clear"])),
       ("noimage.txt", b"caption without image"), ("noimage.json", b"{}"),
       ("a/x.jpg", _encode(_solid("RGB", (16, 16), (0, 200, 0)), "JPEG", quality=95)),
       ("a/x.txt", txt(GOOD["a/x"]))],
      [("b/x.png", _encode(_solid("RGB", (16, 16), (0, 0, 200)), "PNG")),
       ("b/x.txt", txt(GOOD["b/x"])),
       ("deep.png", _encode(Image.fromarray(np.full((8, 8), 40000, np.uint16)), "PNG")),
       ("deep.txt", b"a sixteen-bit image"),
       ("lossless.webp", _encode(_solid("RGB", (8, 8), (1, 2, 3)), "WEBP", lossless=True)),
       ("lossless.txt", txt(GOOD["lossless"])),
       ("wide.png", _wide_png()), ("wide.txt", txt(GOOD["wide"]))],
  ]


@pytest.fixture(scope="module")
def shard_pattern(tmp_path_factory):
  directory = tmp_path_factory.mktemp("shards")
  for i, members in enumerate(_shards()):
    write_tar(directory / f"shard-{i:03d}.tar", members)
  return str(directory / "shard-{000..002}.tar")


def test_expand_braces():
  assert expand_braces("s/{00000..00002}.tar") == ["s/00000.tar", "s/00001.tar", "s/00002.tar"]
  assert expand_braces("{8..10}.tar") == ["8.tar", "9.tar", "10.tar"]
  assert expand_braces("{a,b}/x-{0..1}.tar") == ["a/x-0.tar", "a/x-1.tar", "b/x-0.tar", "b/x-1.tar"]
  assert expand_braces("{a,b{1..2}}.tar") == ["a.tar", "b1.tar", "b2.tar"]
  assert expand_braces("{x,{y,z}}") == ["x", "y", "z"]
  assert expand_braces("a.tar::b{08..10}.tar") == ["a.tar", "b08.tar", "b09.tar", "b10.tar"]
  assert expand_braces(["p.tar", "q{1,2}.tar"]) == ["p.tar", "q1.tar", "q2.tar"]
  assert expand_braces("plain.tar") == ["plain.tar"]
  for bad in ("{0..3.tar", "0..3}.tar", "{a}.tar", "{}.tar", "{3..1}.tar", "{a..c}", "x::"):
    with pytest.raises(ValueError, match="pattern"):
      expand_braces(bad)


def test_split_member_name():
  assert split_member_name("000123.jpg") == ("000123", "jpg")
  assert split_member_name("d/e/000123.seg.JSON") == ("d/e/000123", "seg.json")


def test_source_decodes_good_records(shard_pattern):
  source = WebDatasetSource(shard_pattern)
  assert len(source) == len(GOOD) + len(BAD)
  examples = {e["key"]: e for e in map(source.__getitem__, range(len(source)))}
  assert set(examples) == set(GOOD) | set(BAD)
  for key, caption in GOOD.items():
    assert "error" not in examples[key], examples[key]
    assert examples[key]["caption"] == caption
    assert examples[key]["image"].dtype == np.uint8 and examples[key]["image"].shape[2] == 3
  red = examples["red"]["image"]
  assert red.shape == (30, 40, 3)
  np.testing.assert_allclose(red.reshape(-1, 3), np.broadcast_to(RED, (1200, 3)), atol=6)
  exact = {"gray": (77, 77, 77), "rgba": (10, 20, 30), "palette": (0, 128, 255),
           "clear": (255, 255, 255), "lossless": (1, 2, 3), "b/x": (0, 0, 200)}
  for key, colour in exact.items():
    assert (examples[key]["image"] == np.array(colour, np.uint8)).all(), key
  assert examples["rgba"]["image"].shape == (24, 16, 3)
  assert examples["wide"]["image"].shape == (20, 40, 3)


def test_source_resizes_and_centre_crops(shard_pattern):
  source = WebDatasetSource(shard_pattern, image_size=8)
  examples = {e["key"]: e for e in map(source.__getitem__, range(len(source)))}
  for key in GOOD:
    assert examples[key]["image"].shape == (8, 8, 3)
  # The centre 20x20 of the 40x20 stripes is green; the resize must not reach the red or blue.
  np.testing.assert_allclose(examples["wide"]["image"][:, 1:-1].reshape(-1, 3),
                             np.broadcast_to((0, 255, 0), (48, 3)), atol=2)
  np.testing.assert_allclose(examples["red"]["image"].reshape(-1, 3),
                             np.broadcast_to(RED, (64, 3)), atol=6)


def test_bad_records_return_errors(shard_pattern):
  source = WebDatasetSource(shard_pattern, image_size=8)
  examples = {e["key"]: e for e in map(source.__getitem__, range(len(source)))}
  for key, reason in BAD.items():
    assert set(examples[key]) == {"error", "key"}, examples[key]
    assert reason in examples[key]["error"], (key, examples[key]["error"])
  assert "'I;16'" in examples["deep"]["error"]
  with pytest.raises(IndexError):
    source[len(source)]


def test_caption_keys_order(shard_pattern):
  """With "json" first, the metadata caption of `red` wins over its .txt."""
  source = WebDatasetSource(shard_pattern, caption_keys=("json", "txt"))
  red = next(e for e in map(source.__getitem__, range(len(source))) if e["key"] == "red")
  assert red["caption"] == "ignored"
  source = WebDatasetSource(shard_pattern, caption_keys="json")  # one key, not "j", "s", ...
  assert source.caption_keys == ("json",)


def test_missing_and_invalid_shards(shard_pattern, tmp_path):
  missing = str(tmp_path / "nope-000.tar")
  with pytest.raises(FileNotFoundError, match="nope-000.tar"):
    WebDatasetSource([shard_pattern.replace("{000..002}", "000"), missing])
  not_tar = tmp_path / "junk.tar"
  not_tar.write_bytes(b"hello, this is not a tar archive" * 40)
  with pytest.raises(ValueError, match=r"junk\.tar' is not a tar archive"):
    WebDatasetSource(str(not_tar))
  short = tmp_path / "short.tar"
  short.write_bytes(b"hello")
  with pytest.raises(ValueError, match=r"short\.tar' is not a tar archive"):
    WebDatasetSource(str(short))
  for mode, kind in (("w:gz", "gzip"), ("w:bz2", "bzip2"), ("w:xz", "xz")):
    packed = tmp_path / f"packed-{kind}.tar"
    write_tar(packed, [("k.txt", b"x")], mode)
    with pytest.raises(ValueError,
                       match=rf"packed-{kind}\.tar' is {kind}-compressed; .*uncompressed"):
      WebDatasetSource(str(packed))


def _cut_shard(tmp_path, name: str, keep) -> str:
  """A copy of a two-record shard cut to `keep(members)` bytes, `members` being
  {name: (header offset, data offset, size)}."""
  whole = tmp_path / "whole.tar"
  write_tar(whole, [("a.png", b"A" * 700), ("a.txt", b"first"), ("b.png", b"B" * 900),
                    ("b.txt", b"second")])
  with tarfile.open(whole) as tar:
    members = {m.name: (m.offset, m.offset_data, m.size) for m in tar}
  path = tmp_path / name
  path.write_bytes(whole.read_bytes()[:keep(members)])
  return str(path)


def test_truncated_shards_say_so(tmp_path):
  cases = {  # where the copy stops -> what the message says
      "in-data.tar": (lambda m: m["b.png"][1] + 100,
                      r"member 'b\.png' needs bytes up to \d+ but the file has \d+ bytes"),
      "in-last-data.tar": (lambda m: m["b.txt"][1] + 3,
                           r"member 'b\.txt' needs bytes up to \d+ but the file has \d+ bytes"),
      "in-header.tar": (lambda m: m["b.png"][0] + 200,
                        r"the tar header after member 'a\.txt' is cut off at byte \d+"),
      "in-padding.tar": (lambda m: m["b.txt"][1] + 6 + 10,
                         r"it ends at byte \d+, inside the padding after member 'b\.txt'"),
      "in-first-header.tar": (lambda m: 300,
                              r"it ends at byte 300, inside the first member's header"),
  }
  for name, (keep, detail) in cases.items():
    path = _cut_shard(tmp_path, name, keep)
    with pytest.raises(ValueError, match=rf"shard '.*{name}' is truncated: {detail} "
                       r"\(an interrupted download or copy\?\)"):
      WebDatasetSource(path)
  # Cut within the end-of-archive zero blocks: every member is whole, so it reads normally.
  path = _cut_shard(tmp_path, "in-end-blocks.tar", lambda m: m["b.txt"][1] + 512 + 100)
  assert len(WebDatasetSource(path)) == 2


def test_damaged_shard_says_so(tmp_path):
  path = _cut_shard(tmp_path, "damaged.tar", lambda m: 10**6)
  data = bytearray(open(path, "rb").read())
  with tarfile.open(path) as tar:
    header = next(m.offset for m in tar if m.name == "b.png")
  data[header:header + 512] = b"garbage!" * 64
  open(path, "wb").write(bytes(data))
  with pytest.raises(ValueError, match=r"damaged\.tar' is damaged: the bytes at offset \d+, after "
                     r"member 'a\.txt', are not a tar header"):
    WebDatasetSource(path)


def test_empty_shards(shard_pattern, tmp_path, caplog, monkeypatch):
  write_tar(tmp_path / "empty-0.tar", [])
  (tmp_path / "empty-1.tar").write_bytes(b"")
  with pytest.raises(ValueError, match=r"WebDataset shards '.*empty-\{0\.\.1\}\.tar' hold no "
                     r"records \(2 empty tar files\): check config\.data\.webdataset\.shards"):
    WebDatasetSource(str(tmp_path / "empty-{0..1}.tar"))
  monkeypatch.setattr(logging.getLogger("vljax"), "propagate", True)  # training turns it off
  with caplog.at_level(logging.WARNING, logger="vljax"):
    source = WebDatasetSource([shard_pattern, str(tmp_path / "empty-0.tar")])
  assert len(source) == len(GOOD) + len(BAD)
  assert "Skipping 1 of 4 WebDataset shards that hold no records" in caplog.text
  assert "empty-0.tar" in caplog.text
  first = shard_pattern.replace("{000..002}", "000")
  with caplog.at_level(logging.WARNING, logger="vljax"):
    WebDatasetSource([shard_pattern, first])
  repeated = f"WebDataset shards listed more than once (their records are read as often): {first}"
  assert repeated in caplog.text


def test_source_pickles(shard_pattern):
  source = WebDatasetSource(shard_pattern, image_size=8)
  before = [source[i] for i in range(3)]  # opens shard files
  clone = pickle.loads(pickle.dumps(source))
  source.close()
  after = [clone[i] for i in range(3)]
  for a, b in zip(before, after):
    assert a.keys() == b.keys() and a["key"] == b["key"]
    if "image" in a:
      np.testing.assert_array_equal(a["image"], b["image"])
  clone.close()


def test_skip_bad_and_batch_one_epoch(shard_pattern):
  source = WebDatasetSource(shard_pattern, image_size=8)
  parent = grain.MapDataset.source(source).to_iter_dataset()
  batches = list(SkipBadAndBatch(parent, 3, drop_remainder=False, keep_strings=True))
  keys = [k for b in batches for k in b["key"]]
  assert sorted(keys) == sorted(GOOD)
  assert sum(int(b[SKIPPED]) for b in batches) == len(BAD)
  assert sorted(k for b in batches for k in b[SKIPPED_KEYS]) == sorted(BAD)
  for b in batches:
    assert b["image"].shape == (len(b["key"]), 8, 8, 3) and b["image"].dtype == np.uint8
    assert b["caption"] == [GOOD[k] for k in b["key"]]
  # Without keep_strings only arrays and the bookkeeping remain; every batch is full.
  batches = list(SkipBadAndBatch(parent, 4))
  assert len(batches) == len(GOOD) // 4
  assert all(set(b) == {"image", SKIPPED, SKIPPED_KEYS, SKIPPED_REASONS} and len(b["image"]) == 4
             for b in batches)


def test_skip_bad_and_batch_restores_exactly(shard_pattern):
  source = WebDatasetSource(shard_pattern, image_size=8)
  parent = grain.MapDataset.source(source).repeat().shuffle(seed=3).to_iter_dataset()
  dataset = SkipBadAndBatch(parent, 4, keep_strings=True)
  iterator = iter(dataset)
  for _ in range(2):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint would store it
  expected = [next(iterator) for _ in range(4)]
  restored = iter(dataset)
  restored.set_state(state)
  for want, got in zip(expected, (next(restored) for _ in range(4))):
    assert want["key"] == got["key"] and want[SKIPPED_KEYS] == got[SKIPPED_KEYS]
    assert int(want[SKIPPED]) == int(got[SKIPPED])
    np.testing.assert_array_equal(want["image"], got["image"])
  assert sum(int(b[SKIPPED]) for b in expected) > 0  # the window does cross bad records


def test_bad_record_counter():
  counter = BadRecordCounter(max_bad_fraction=0.5, min_records=10, max_keys=3)
  counter.update(4, 4, ["k0", "k1", "k2", "k3"])  # 100% bad, but too few records to judge
  clean = {"image": np.zeros((6, 2)), SKIPPED: np.int64(0), SKIPPED_KEYS: []}
  assert set(counter.observe(clean)) == {"image"}
  assert (counter.total, counter.bad) == (10, 4)
  assert counter.first_bad_keys == ["k0", "k1", "k2"]
  with pytest.raises(TooManyBadRecordsError, match=r"7 of 13 .*53\.85%.*50\.00%.*k0, k1, k2"):
    counter.update(3, 3, ["k9"])
  ok = BadRecordCounter(max_bad_fraction=0.2, min_records=10)
  for _ in range(10):
    ok.update(1, 10)  # exactly 10% bad: fine
  assert ok.fraction == pytest.approx(0.1)
