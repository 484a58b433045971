"""Zero-shot classification on TFDS classification datasets (cifar100, imagenet2012, ...).

Configured as `config.evals.NAME = dict(type="tfds_zeroshot", name="cifar100", ...)`; the fields
and defaults are `SPEC_DEFAULTS`, and the metrics "NAME/top1" and "NAME/top5" (with 5 or more
classes), plus "NAME/images" (images scored) and "NAME/skipped" (bad records left out); configs
name the entry "zeroshot_<dataset>" by convention.
Class names come from the dataset's ClassLabel feature ("aquarium_fish" -> "aquarium fish") or
from the spec; prompts are CLIP-style templates averaged per class. The images are read and
decoded again at every evaluation (a full ImageNet validation set does not fit in host memory
at 224px), by several threads.
"""
from __future__ import annotations

import os
import re
from typing import Any, Sequence

import grain
import ml_collections
import numpy as np

from vljax.data.pipeline import encode_texts
from vljax.data.tfds import open_tfds_source
from vljax.errors import ConfigError
from vljax.evals.base import Environment, Evaluator, Predict, register
from vljax.evals.zeroshot import zeroshot_accuracy, zeroshot_classifier

# A few of CLIP's ImageNet prompts that suit any photo classification set.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "itap of a {}.",
)

SPEC_DEFAULTS = dict(
    name="",  # TFDS dataset, optionally with config / version
    split="test",  # TFDS split syntax ("validation", "test[:1000]")
    data_dir="",  # "" = config.data.tfds.data_dir (and TFDS's default where that is "")
    image_key="image",
    label_key="label",  # a ClassLabel feature
    # () = the label feature's names, "_" -> " " (refused when they are bare numbers or WordNet
    # ids, as imagenet2012's are); else a list of names, or a text file with one name a line.
    class_names=(),
    templates=(),  # () = DEFAULT_TEMPLATES; each holds "{}" once
    num_images=0,  # 0 = the whole split; N = its first N records
)

_WORDNET_ID = re.compile(r"n\d{8}")


def readable_class_names(names: Sequence[str]) -> list[str]:
  """ClassLabel names -> prompt words: "aquarium_fish" -> "aquarium fish"."""
  return [" ".join(name.replace("_", " ").split()) for name in names]


def _explicit_class_names(value: Any, where: str) -> list[str]:
  if isinstance(value, str):
    if not os.path.isfile(value):
      raise FileNotFoundError(f"{where}.class_names={value!r}: no such file (a text file with "
                              "one class name a line, or give a list)")
    with open(value, encoding="utf-8") as f:
      return [line.strip() for line in f if line.strip()]
  names = [str(n) for n in value]
  if any(not n.strip() for n in names):
    raise ValueError(f"{where}.class_names holds an empty name")
  return names


@register("tfds_zeroshot")
class TfdsZeroShot(Evaluator):
  """Zero-shot top-1 / top-5 of one TFDS classification split."""

  NEEDS = ("embed_images", "embed_texts")
  SETTINGS = SPEC_DEFAULTS

  def __init__(self, key: str, settings: ml_collections.ConfigDict, env: Environment):
    super().__init__(key, settings, env)
    where, data_cfg = self.where, env.data
    self.key, self.prefix, self.spec = key, key, settings
    self.batch_size = settings.batch_size
    if not settings.name:
      raise ConfigError(f"{where}.name: give the TFDS dataset (e.g. 'cifar100')")
    name = settings.name
    self.source = open_tfds_source(
        lambda argument: f"{where}.{argument}", f"{where} (name / data_dir)", name,
        split=self.spec.split, data_dir=self.spec.data_dir or data_cfg.tfds.data_dir or None,
        image_size=data_cfg.image_size, image_key=self.spec.image_key, caption_key=None,
        label_key=self.spec.label_key)
    if self.spec.class_names:
      self.class_names = _explicit_class_names(self.spec.class_names, where)
      labels = self.source.label_names
      if labels is not None and len(self.class_names) != len(labels):
        raise ValueError(f"{where}.class_names has {len(self.class_names)} names but "
                         f"{name}'s {self.spec.label_key!r} has {len(labels)} classes")
    else:
      names = self.source.label_names
      if names is None:
        raise ValueError(f"{where}: {name}'s {self.spec.label_key!r} is not a ClassLabel; "
                         f"set {where}.class_names")
      if all(n == str(i) for i, n in enumerate(names)):
        raise ValueError(f"{where}: {name}'s {self.spec.label_key!r} classes have no names, only "
                         f"numbers; set {where}.class_names")
      if all(_WORDNET_ID.fullmatch(n) for n in names):
        raise ValueError(f"{where}: {name}'s {self.spec.label_key!r} classes are WordNet ids "
                         f"({', '.join(names[:2])}, ...), not words; set {where}.class_names to "
                         "readable names (a list, or a text file with one name a line)")
      self.class_names = readable_class_names(names)
    self.templates = tuple(self.spec.templates) or DEFAULT_TEMPLATES

  @classmethod
  def check(cls, settings: ml_collections.ConfigDict, where: str) -> None:
    if not isinstance(settings.num_images, int) or settings.num_images < 0:
      raise ConfigError(f"{where}.num_images must be a non-negative int, got "
                        f"{settings.num_images!r}")
    for template in settings.templates:
      if not isinstance(template, str) or template.count("{}") != 1:
        raise ConfigError(f"{where}.templates: {template!r} must hold '{{}}' exactly once")

  def describe(self) -> str:
    return f"{self.name}: zero-shot on TFDS {self.spec.name}"

  def tokenize(self, texts: list[str]) -> np.ndarray:
    return encode_texts(self.env.data, self.env.tokenizer, texts)

  def _examples(self):
    """The split's examples (or its first num_images), read and decoded by threads, in order."""
    ds = grain.MapDataset.source(self.source)
    if self.spec.num_images:
      ds = ds[:self.spec.num_images]
    threads = min(16, os.cpu_count() or 1)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                prefetch_buffer_size=4 * self.batch_size))

  def run(self, predict: Predict) -> dict[str, float]:
    # predict runs in fixed-size batches of settings.batch_size itself.
    text_fn = lambda texts: predict("embed_texts", {"text": self.tokenize(texts)})
    classifier = zeroshot_classifier(text_fn, self.class_names, self.templates)
    num_classes = len(self.class_names)
    embeddings, labels, pending, skipped, first_error = [], [], [], 0, ""

    def flush():
      embeddings.append(predict("embed_images", {"image": np.stack([e["image"] for e in pending])}))
      labels.extend(e["label"] for e in pending)
      pending.clear()

    for example in self._examples():
      if "error" not in example and not 0 <= example["label"] < num_classes:
        example = {"error": f"label {example['label']} outside [0, {num_classes})",
                   "key": example["key"]}
      if "error" in example:
        skipped += 1
        first_error = first_error or f"{example['key']}: {example['error']}"
        continue
      pending.append(example)
      if len(pending) == self.batch_size:
        flush()
    if pending:
      flush()
    if not labels:
      raise ValueError(f"{self.where}: no usable image in "
                       f"{self.source!r} ({skipped} bad records; first: {first_error or 'none'})")
    metrics = zeroshot_accuracy(np.concatenate(embeddings), classifier, labels, prefix=self.prefix)
    metrics[f"{self.prefix}/images"] = float(len(labels))
    metrics[f"{self.prefix}/skipped"] = float(skipped)
    return metrics
