"""TFDS datasets stored as array_record as a grain random-access source.

`TfdsSource` reads a dataset that TFDS prepared in the array_record format (`tfds build NAME
--file_format=array_record`, or `download=True` here) through TFDS's data source API, which
gives `len()` and `source[i]` for any `i`: what grain's shuffling, sharding and exact resume
need. Which features hold the image, the caption and the label is configured by path ("image",
"captions/text": "/" descends into nested features).

A prepared dataset is opened from its files alone (as `tfds.data_source` does when the builder's
code is absent), so reading needs neither TensorFlow nor the builder's code: some builders
(`coco_captions`) import TensorFlow just to describe their features. Only `download=True`, which
prepares a missing dataset, uses the builder's code.

Images are read as their stored bytes and decoded by `vljax.data.webdataset.decode_rgb` (RGB,
alpha over white, centre square resized to `image_size`). Records that cannot be used (unreadable,
an image that does not decode or has a mode with no faithful RGB conversion, an empty caption)
come back as `{"error": reason, "key": key}` instead of raising, so that
`vljax.data.batching.SkipBadAndBatch` can skip and count them.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, SupportsIndex

import numpy as np
from PIL import Image

from vljax.data.webdataset import decode_rgb, to_rgb

INSTALL_HINT = ("pip install 'vljax[tfds]' (tensorflow-datasets and array-record; TensorFlow is "
                "not needed)")


def import_tfds():
  """`tensorflow_datasets`, or an ImportError saying how to install it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"TFDS data sources need tensorflow_datasets, which is not installed: "
                      f"{INSTALL_HINT}") from e
  return tfds


class TfdsFeatureError(ValueError):
  """A feature path (`argument`: "image_key", "caption_key" or "label_key") that the dataset lacks
  or whose feature has the wrong type."""

  def __init__(self, argument: str, path: str, detail: str):
    super().__init__(f"{argument}={path!r} {detail}")
    self.argument, self.path, self.detail = argument, path, detail


def feature_paths(feature: Any, prefix: str = "") -> list[str]:
  """Every leaf feature's "/"-joined path (sequences are looked through), sorted."""
  tfds = import_tfds()
  if isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  if isinstance(feature, tfds.features.FeaturesDict):
    return [path for key in sorted(feature.keys())
            for path in feature_paths(feature[key], f"{prefix}{key}/")]
  return [prefix.rstrip("/")]


def feature_at(features: Any, path: str, argument: str, dataset: str) -> tuple[Any, bool]:
  """(leaf feature at `path`, whether a Sequence lies on the way); TfdsFeatureError if absent."""
  tfds = import_tfds()
  feature, in_sequence = features, False
  for part in path.split("/"):
    if isinstance(feature, tfds.features.Sequence):
      feature, in_sequence = feature.feature, True
    if not isinstance(feature, tfds.features.FeaturesDict) or part not in feature.keys():
      raise TfdsFeatureError(argument, path, f"is not a feature of TFDS dataset {dataset!r}; "
                             f"its features: {', '.join(feature_paths(features))}")
    feature = feature[part]
  if isinstance(feature, tfds.features.Sequence):
    feature, in_sequence = feature.feature, True
  return feature, in_sequence


def _value_at(example: dict[str, Any], parts: tuple[str, ...]) -> Any:
  for part in parts:
    example = example[part]
  return example


def _nested(parts: tuple[str, ...], leaf: Any) -> dict[str, Any]:
  """("a", "b"), x -> {"a": {"b": x}}: the shape of TFDS's `decoders` argument."""
  for part in reversed(parts):
    leaf = {part: leaf}
  return leaf


def _texts(value: Any) -> list[str]:
  """A Text feature's value (str, bytes, or a list / array of them) -> stripped, non-empty strs."""
  if isinstance(value, (str, bytes)):
    items = [value]
  else:
    items = list(np.asarray(value, dtype=object).reshape(-1))
  texts = [item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
           for item in items]
  return [t.strip() for t in texts if t.strip()]


def _array_image(array: np.ndarray) -> Image.Image | str:
  """A uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] array -> PIL image, or why not."""
  if array.dtype != np.uint8:
    return f"unsupported image dtype {array.dtype} (need uint8)"
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
    return f"unsupported image shape {array.shape}"
  return Image.fromarray(array)


def _open_builder(name: str, data_dir: str | None, download: bool):
  tfds = import_tfds()
  if download:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder
  from tensorflow_datasets.core import read_only_builder  # pylint: disable=import-outside-toplevel
  try:
    return read_only_builder.builder_from_files(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    where = (repr(data_dir) if data_dir
             else "TFDS's default data_dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)")
    raise FileNotFoundError(
        f"No prepared TFDS dataset {name!r} in {where}. Prepare it once with `tfds build "
        f"{name.partition(':')[0]} --data_dir={data_dir or 'DIR'} --file_format=array_record`, "
        "or with download=True; a name can carry a config and version, e.g. "
        "'coco_captions/2014:1.1.0'") from e


class TfdsSource:
  """Records of a TFDS split: index -> {"image", "caption"?, "label"?, "key"} or {"error", "key"}.

  `caption_key` (a Text feature or a sequence of them, e.g. COCO's five captions) gives "caption":
  of several non-empty captions, record i takes number i % count, so a record always pairs with the
  same one; None reads no caption. `label_key` (a ClassLabel or integer feature) gives "label" as
  an int; None reads no label. Without `image_size` images keep their own size and cannot be
  batched together. EXIF orientation is ignored by default, as TFDS's own decoders do.
  Implements grain's RandomAccessDataSource protocol and pickles for grain worker processes.
  """

  def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None,
               image_size: int | None = None, image_key: str = "image",
               caption_key: str | None = "captions/text", label_key: str | None = None,
               exif_transpose: bool = False, download: bool = False):
    if not name:
      raise ValueError("TfdsSource needs a dataset name, e.g. 'coco_captions' or 'cifar100'")
    if image_size is not None and image_size < 1:
      raise ValueError(f"image_size must be positive, got {image_size}")
    if not image_key:
      raise TfdsFeatureError("image_key", image_key, "is empty; name the image feature")
    tfds = import_tfds()
    self.name, self.split = name, split
    self.image_size, self.exif_transpose = image_size, exif_transpose
    builder = _open_builder(name, data_dir or None, download)
    self.info = builder.info
    features = self.info.features

    image, in_sequence = feature_at(features, image_key, "image_key", name)
    array = isinstance(image, tfds.features.Tensor) and image.np_dtype == np.uint8
    if in_sequence or not (isinstance(image, tfds.features.Image) or array):
      kind = f"{'sequence of ' if in_sequence else ''}{image!r}"
      raise TfdsFeatureError("image_key", image_key, f"is a {kind}, not one image")
    self._image_path = tuple(image_key.split("/"))
    # Encoded images are read as their bytes: decode_rgb converts any mode and reports bad ones,
    # where TFDS's decoder would raise (and keep palette indices or alpha as they are).
    decoders = (_nested(self._image_path, tfds.decode.SkipDecoding())
                if isinstance(image, tfds.features.Image) else None)

    self._caption_path = None
    if caption_key:
      text, _ = feature_at(features, caption_key, "caption_key", name)
      if not isinstance(text, tfds.features.Tensor) or text.np_dtype != np.object_:
        raise TfdsFeatureError("caption_key", caption_key, f"is a {text!r}, not a Text feature")
      self._caption_path = tuple(caption_key.split("/"))

    self._label_path, self.label_names = None, None
    if label_key:
      label, in_sequence = feature_at(features, label_key, "label_key", name)
      if isinstance(label, tfds.features.ClassLabel):
        self.label_names = list(label.names)
      elif not (isinstance(label, tfds.features.Tensor)
                and np.issubdtype(label.np_dtype, np.integer)):
        raise TfdsFeatureError("label_key", label_key, f"is a {label!r}, not a ClassLabel")
      if in_sequence:
        raise TfdsFeatureError("label_key", label_key, "is a sequence; a record needs one label")
      self._label_path = tuple(label_key.split("/"))

    stored = self.info.available_file_formats()
    if not stored & set(tfds.core.FileFormat.with_random_access()):
      raise ValueError(
          f"TFDS dataset {name!r} is stored as {', '.join(sorted(f.value for f in stored)) or '?'}"
          f", which has no random access; prepare it again with `tfds build "
          f"{name.partition(':')[0]} --file_format=array_record`")
    try:
      self._source = builder.as_data_source(split=split, decoders=decoders)
    except ValueError as e:  # e.g. an unknown split
      raise ValueError(f"TFDS dataset {name!r}, split {split!r}: {e}") from e

  def __len__(self) -> int:
    return len(self._source)

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} records)"

  def __getitem__(self, index: SupportsIndex) -> dict[str, Any]:
    index = operator.index(index)
    if not 0 <= index < len(self):
      raise IndexError(f"Index {index} is out of range for {len(self)} records")
    key = f"{self.name}/{self.split}[{index}]"
    try:
      record = self._source[index]
    except Exception as e:  # pylint: disable=broad-except
      # A damaged chunk or example proto: reported, so the run counts it instead of dying.
      return {"error": f"cannot read record ({type(e).__name__}: {e})", "key": key}
    example: dict[str, Any] = {"key": key}
    if self._caption_path is not None:
      captions = _texts(_value_at(record, self._caption_path))
      if not captions:
        return {"error": f"missing or empty caption ({'/'.join(self._caption_path)})", "key": key}
      example["caption"] = captions[index % len(captions)]
    if self._label_path is not None:
      example["label"] = int(_value_at(record, self._label_path))
    value = _value_at(record, self._image_path)
    if isinstance(value, bytes):
      image = decode_rgb(value, self.image_size, self.exif_transpose)
    else:
      image = _array_image(np.asarray(value))
      if not isinstance(image, str):
        image = to_rgb(image, self.image_size, self.exif_transpose)
    if isinstance(image, str):
      return {"error": image, "key": key}
    example["image"] = image
    return example


def open_tfds_source(field: Callable[[str], str], where: str, name: str, **kwargs) -> TfdsSource:
  """`TfdsSource(name, **kwargs)` with its errors restated in the caller's config terms:
  `field(argument)` names the config field behind "image_key" / "caption_key" / "label_key", and
  `where` the fields behind the dataset's name and location."""
  try:
    return TfdsSource(name, **kwargs)
  except TfdsFeatureError as e:
    raise ValueError(f"{field(e.argument)}={e.path!r} {e.detail}") from e
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{where}: {e}") from e
