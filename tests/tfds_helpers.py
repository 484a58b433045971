"""Tiny TFDS datasets written in the array_record format for tests: no network, no TensorFlow."""
from __future__ import annotations

import io
import os
import types
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **kw) -> bytes:
  """A PIL image (or a uint8 array) as PNG / JPEG / ... bytes."""
  if isinstance(image, np.ndarray):
    image = Image.fromarray(image)
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kw)
  return buffer.getvalue()


def build_dataset(data_dir: str | os.PathLike[str], name: str, features: tfds.features.FeaturesDict,
                  splits: Mapping[str, Sequence[dict[str, Any]]]) -> None:
  """Prepares dataset `name` (version 1.0.0) under `data_dir`, records in the given order.

  Images must be given encoded (bytes): TFDS encodes arrays with TensorFlow. The builder class is
  not registered, so the dataset is found from its files, like one prepared elsewhere.
  """

  def body(namespace: dict[str, Any]) -> None:
    namespace["name"] = name
    namespace["VERSION"] = tfds.core.Version("1.0.0")

    def _info(self):
      # disable_shuffling: the records keep the order given.
      return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):  # pylint: disable=unused-argument
      return {split: self._generate_examples(rows) for split, rows in splits.items()}

    def _generate_examples(self, rows):  # pylint: disable=unused-argument
      for i, row in enumerate(rows):
        yield i, row

    namespace.update(_info=_info, _split_generators=_split_generators,
                     _generate_examples=_generate_examples)

  cls = types.new_class(f"TestBuilder_{name}", (tfds.core.GeneratorBasedBuilder,),
                        {"skip_registration": True}, body)
  builder = cls(data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
