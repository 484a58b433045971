"""Every checkpoint format vljax reads, behind one call: `read(path) -> Imported`.

`experiments/eval.py --checkpoint=PATH` and `config.init` (`vljax.train.initialise`) both read
checkpoints through this registry, so a format added here is evaluated, fine-tuned and used as
a frozen tower (LiT) without touching either. A format is detected from the path:

  vljax         a vljax workdir, its checkpoints dir, or one step dir (orbax)
  transformers  a Hugging Face model directory (config.json + safetensors): CLIP and SigLIP
                (`hf_clip`), LLaMA / OPT / GPT-2 / T5 (`hf_lm`), LLaVA (`hf_llava`)
  open_clip     an open_clip hub directory (open_clip_config.json + open_clip_model.safetensors):
                CLIP and CoCa (`open_clip`)
  big_vision    a big_vision SigLIP parameter file (`.npz`, `big_vision`)

An imported model comes with what a config needs to rebuild it: `family`, the `config.model`
fields of the module the importer built (less those the tokenizer and `config.loss` own), and
hints for `config.data` / `config.loss` (image size and normalisation, tokenizer, text length,
contrastive loss). A vljax checkpoint has none: its config is the one given.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import numpy as np

from vljax.convert import (big_vision, hf, hf_clip, hf_image, hf_llava, hf_lm, open_clip,
                           posemb)
from vljax.models import t5
from vljax.models.two_tower import TwoTower

# Module fields a config does not set: the runtime dtypes (config.compute_dtype) and, as in
# `vljax.families.base.FIELD_OWNERS`, what the tokenizer and config.loss own.
_NOT_CONFIG_FIELDS = ("parent", "name", "dtype", "param_dtype", "pad_id", "contrastive")


@dataclasses.dataclass(frozen=True)
class Imported:
  """A checkpoint read into vljax's parameter layout (layers unscanned unless it was saved
  scanned)."""

  format: str  # "vljax" | "transformers" | ...
  path: str
  params: Any
  family: str | None = None  # config.family of the model; None: the config says
  model: Mapping[str, Any] | None = None  # config.model fields
  data: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config.data hints
  loss: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # config.loss hints
  scanned: Callable[[Any], Any] | None = None  # params -> the same with layers stacked
  # How its code resamples a ViT's position table for another image size (vljax.convert.posemb):
  # config.init does so when the model sees other images than the checkpoint did.
  posemb_method: str = "bicubic"

  def apply_to(self, config) -> None:
    """Sets config.family, config.model and the data / loss hints from this checkpoint."""
    if self.family is not None:
      config.family = self.family
    if self.model is not None:
      config.model = dict(self.model)
    for key, value in self.data.items():
      config.data[key] = value
    for key, value in self.loss.items():
      config.loss[key] = value


def config_fields(module: nn.Module) -> dict[str, Any]:
  """The `config.model` fields that rebuild `module` (sub-module dicts copied; dtypes, the pad id
  and the contrastive loss left to the config and tokenizer)."""

  def clean(value):
    if isinstance(value, Mapping):
      return {k: clean(v) for k, v in value.items() if k not in _NOT_CONFIG_FIELDS}
    return list(value) if isinstance(value, tuple) else value

  return {f.name: clean(getattr(module, f.name)) for f in dataclasses.fields(module)
          if f.init and f.name not in _NOT_CONFIG_FIELDS}


def _json(path: str) -> dict[str, Any]:
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError):
    return {}
  return value if isinstance(value, dict) else {}


def _has_tokenizer(directory: str) -> bool:
  return any(os.path.isfile(os.path.join(directory, name))
             for name in ("tokenizer.json", "tokenizer.model", "spiece.model"))


def _normalisation(path: str) -> dict[str, Any]:
  """image_mean / image_std from a directory's processor config (CLIP's, SigLIP's, LLaVA's)."""
  processor, data = _json(os.path.join(path, hf_image.PREPROCESSOR_CONFIG)), {}
  for key in ("image_mean", "image_std"):
    value = processor.get(key)
    if isinstance(value, (int, float)):
      value = [value] * 3
    if isinstance(value, list) and len(value) == 3:
      data[key] = tuple(float(x) for x in value)
  return data


def _read_transformers(path: str) -> Imported:
  model_type = _json(os.path.join(path, hf.CONFIG_NAME)).get("model_type")
  if model_type == hf_llava.MODEL_TYPE:
    model, params = hf_llava.load(path)
    data = dict(image_size=hf_llava.image_size_of(model, params), **_normalisation(path))
    if _has_tokenizer(path):
      data["tokenizer"] = path
    return Imported("transformers", path, params, family="llava", model=config_fields(model),
                    data=data, scanned=lambda p: hf_llava.scan_params(model, p))
  if hf_clip.handles(model_type):
    model, params = hf_clip.load(path)
    data: dict[str, Any] = dict(image_size=hf_clip.image_size_of(model, params),
                                max_text_len=int(model.text["max_len"]),
                                **_normalisation(path))
    if _has_tokenizer(path):  # its template: CLIP's bos text eos, SigLIP's text eos
      data.update(tokenizer=path, text_bos=model_type == "clip", text_eos=True)
    return _two_tower("transformers", path, model, params, data,
                      posemb_method="bilinear_antialias" if model_type == "siglip2" else "bicubic")
  model, params = hf_lm.load(path)
  family = "t5" if isinstance(model, t5.T5) else "lm"
  data = {"tokenizer": path} if _has_tokenizer(path) else {}
  return Imported("transformers", path, params, family=family, model=config_fields(model),
                  data=data, scanned=lambda p: hf_lm.scan_params(model, p))


def _two_tower(fmt: str, path: str, model: TwoTower, params: Any, data: Mapping[str, Any],
               posemb_method: str = "bicubic") -> Imported:
  image, text = hf_clip.tower_modules(model)
  depths = {"image": {"depth": image.sizes()["depth"]}, "text": {"depth": text.sizes()["depth"]}}
  return Imported(fmt, path, params, family="two_tower", model=config_fields(model),
                  data=dict(data), loss=dict(contrastive=model.contrastive),
                  scanned=lambda p: hf_clip.stack_layers(p, depths), posemb_method=posemb_method)


def _read_big_vision(path: str) -> Imported:
  model, params = big_vision.load(path)
  # big_vision's SigLIP input pipeline: images in [-1, 1], texts padded to the tower's length
  # with the sticky EOS last (the tokenizer is not part of the file).
  data = dict(image_size=hf_clip.image_size_of(model, params), image_mean=(0.5, 0.5, 0.5),
              image_std=(0.5, 0.5, 0.5), max_text_len=int(model.text["max_len"]), text_eos=True)
  return _two_tower("big_vision", path, model, params, data, posemb_method="bilinear_corners")


def _read_open_clip(path: str) -> Imported:
  config = open_clip.read_config(path)
  model, params = open_clip.load(path)
  height, width = open_clip.image_size(config)
  preprocess = config.get("preprocess_cfg") or {}
  data: dict[str, Any] = dict(
      image_mean=tuple(float(x) for x in preprocess.get("mean", open_clip.OPENAI_MEAN)),
      image_std=tuple(float(x) for x in preprocess.get("std", open_clip.OPENAI_STD)))
  if height == width:
    data["image_size"] = height
  if isinstance(model, TwoTower):
    # open_clip's tokenizer (vljax.convert.clip_bpe) is not a directory of the checkpoint's:
    # the text length is set, the tokenizer stays the config's.
    data["max_text_len"] = int(model.text["max_len"])
    return _two_tower("open_clip", path, model, params, data, posemb_method="bicubic_antialias")
  return Imported("open_clip", path, params, family="coca", model=config_fields(model),
                  data=data, loss=dict(contrastive=model.contrastive),
                  scanned=lambda _: open_clip.load(path, scan=True)[1],
                  posemb_method="bicubic_antialias")


def _read_vljax(path: str) -> Imported:
  from vljax.train.checkpoint import load_params  # pylint: disable=import-outside-toplevel
  return Imported("vljax", path, load_params(path))


# (name, what it is called in errors, detect(path) -> bool, read(path) -> Imported), tried in
# order; vljax (any directory) last.
FORMATS: tuple[tuple[str, str, Callable[[str], bool], Callable[[str], Imported]], ...] = (
    ("open_clip", "open_clip model directory",
     lambda path: os.path.isfile(os.path.join(path, open_clip.CONFIG_NAME)), _read_open_clip),
    ("transformers", "Hugging Face model", hf_lm.is_hf_dir, _read_transformers),
    ("big_vision", "big_vision .npz file", lambda path: path.endswith(".npz"), _read_big_vision),
    ("vljax", "vljax checkpoint", os.path.isdir, _read_vljax),
)


def describe(name: str) -> str:
  """What format `name` is called in messages ("Hugging Face model" for transformers)."""
  return next(desc for fmt, desc, _, _ in FORMATS if fmt == name)


def detect(path: str | os.PathLike[str]) -> str:
  """The name of the format `path` is in; raises naming the path and the formats if none."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"No checkpoint at {path}")
  for name, _, matches, _ in FORMATS:
    if matches(path):
      return name
  raise ValueError(f"{path} is not a checkpoint vljax reads; formats: "
                   f"{', '.join(desc for _, desc, _, _ in FORMATS)}")


def read(path: str | os.PathLike[str]) -> Imported:
  """The checkpoint at `path`, in whichever format it is (see the module docstring)."""
  path = os.fspath(path)
  name = detect(path)
  reader = next(read for fmt, _, _, read in FORMATS if fmt == name)
  return reader(path)


def resize_position_table(path: str, value: Any, want_shape: Sequence[int],
                          method: str) -> np.ndarray | None:
  """A ViT's learned position table ([1, prefix + rows * cols, D] at ".../pos_embedding/
  pos_embedding") resampled to `want_shape`'s square grid by `method` (see `Imported.
  posemb_method`), for a model that sees another image size than the checkpoint's; None when
  `path` is no such table or the shapes say otherwise."""
  shape, want = tuple(np.shape(value)), tuple(want_shape)
  if (not path.endswith("pos_embedding/pos_embedding") or len(shape) != 3 or len(want) != 3
      or shape[0] != want[0] or shape[2] != want[2] or shape == want):
    return None
  for prefix in (0, 1):  # no extra token, or a CLS token
    old, new = math.isqrt(shape[1] - prefix), math.isqrt(want[1] - prefix)
    if old and new and old * old == shape[1] - prefix and new * new == want[1] - prefix:
      table = posemb.resample(np.asarray(value)[0], (new, new), method=method, num_prefix=prefix)
      return table[None]
  return None
