"""The records an evaluator reads: the shapes world's validation split (the default), or a
TFDS split or WebDataset shards named in the evaluator's `source` sub-dict."""
from __future__ import annotations

from typing import Any

import ml_collections

from vljax.data.shapes import ShapesWorld
from vljax.data.tfds import open_tfds_source
from vljax.data.webdataset import WebDatasetSource
from vljax.errors import ConfigError

SOURCE_DEFAULTS = {
    "shapes": dict(kind="shapes", min_objects=0, max_objects=0),  # 0: the training data's
    # data_dir "" = config.data.tfds.data_dir (and TFDS's default where that is "")
    "tfds": dict(kind="tfds", name="", split="validation", data_dir="", image_key="image",
                 caption_key="captions/text", label_key=""),
    "webdataset": dict(kind="webdataset", shards="", caption_keys=("txt", "json"),
                       json_caption_field="caption"),
}


def source_settings(source: Any, where: str) -> ml_collections.ConfigDict:
  """An evaluator's `source` ("shapes" or a sub-dict with `kind`) completed from its defaults."""
  spec = {"kind": source} if isinstance(source, str) else dict(source)
  kind = spec.get("kind", "shapes")
  if kind not in SOURCE_DEFAULTS:
    raise ConfigError(f"{where}.source kind {kind!r}; choose one of {', '.join(SOURCE_DEFAULTS)}")
  unknown = sorted(set(spec) - set(SOURCE_DEFAULTS[kind]))
  if unknown:
    raise ConfigError(f"Unknown key(s) {', '.join(f'{where}.source.{k}' for k in unknown)} for a "
                      f"{kind!r} source; valid keys: {', '.join(sorted(SOURCE_DEFAULTS[kind]))}")
  return ml_collections.ConfigDict({**SOURCE_DEFAULTS[kind], **spec})


def open_source(source: Any, where: str, data: ml_collections.ConfigDict, count: int, **shapes_kw):
  """The random-access source an evaluator reads its first `count` records from."""
  spec = source_settings(source, where)
  if spec.kind == "shapes":
    kw = dict(split="validation", seed=data.shapes.world_seed, image_size=data.image_size,
              min_objects=spec.min_objects or data.shapes.min_objects,
              max_objects=spec.max_objects or data.shapes.max_objects, num_examples=max(count, 1),
              annotations=True)
    kw.update(shapes_kw)
    return ShapesWorld(**kw)
  if spec.kind == "tfds":
    if not spec.name:
      raise ConfigError(f"{where}.source.name: give the TFDS dataset (e.g. 'coco_captions')")
    return open_tfds_source(lambda argument: f"{where}.source.{argument}",
                            f"{where}.source (name / data_dir)", spec.name, split=spec.split,
                            data_dir=spec.data_dir or data.tfds.data_dir or None,
                            image_size=data.image_size,
                            image_key=spec.image_key, caption_key=spec.caption_key or None,
                            label_key=spec.label_key or None)
  if not spec.shards:
    raise ConfigError(f"{where}.source.shards: give the WebDataset shards (a brace pattern)")
  return WebDatasetSource(spec.shards, image_size=data.image_size, caption_keys=spec.caption_keys,
                          json_caption_field=spec.json_caption_field)


def image_caption_records(evaluator, count: int) -> tuple[Any, list[dict]]:
  """(source, its first `count` usable records with an image and a caption) of an evaluator."""
  source = open_source(evaluator.settings.source, evaluator.where, evaluator.env.data, count)
  return source, read_records(source, count, evaluator.where, needs=("image", "caption"))


def read_records(source, count: int, where: str, needs: tuple[str, ...] = ()) -> list[dict]:
  """The first `count` usable records of `source` (bad ones, or ones lacking a field in `needs`,
  skipped); raises naming the evaluator when fewer exist."""
  records, skipped, first_error = [], 0, ""
  for index in range(len(source)):
    if len(records) == count:
      break
    record = source[index]
    missing = [k for k in needs if k not in record]
    if "error" in record or missing:
      skipped += 1
      first_error = first_error or (record.get("error") or f"no {', '.join(missing)}")
      continue
    records.append(record)
  if len(records) < count:
    raise ValueError(f"{where}: wanted {count} records, found {len(records)} usable in {source!r} "
                     f"({skipped} skipped; first: {first_error or 'none'})")
  return records

