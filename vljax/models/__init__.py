"""Model families and the explicit registry from model name to constructor."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn

from vljax.models.coca import CoCa
from vljax.models.text import TextTransformer
from vljax.models.two_tower import TwoTower
from vljax.models.vit import ViT

# Explicit name -> constructor (no import-by-string). Later families add themselves here.
MODELS: dict[str, type[nn.Module]] = {
    "two_tower": TwoTower,
    "coca": CoCa,
    "vit": ViT,
    "text": TextTransformer,
}

# Fields of a model whose value is itself the field dict of a sub-module.
SUBMODULE_FIELDS: dict[tuple[str, str], type[nn.Module]] = {
    ("two_tower", "image"): ViT,
    ("two_tower", "text"): TextTransformer,
    ("coca", "image"): ViT,
}


def module_fields(cls: type[nn.Module]) -> set[str]:
  return {f.name for f in dataclasses.fields(cls) if f.init} - {"parent", "name"}


def check_fields(cls: type[nn.Module], cfg: Mapping[str, Any], where: str) -> None:
  """Raises ValueError naming any key of `cfg` that `cls` does not have."""
  valid = module_fields(cls)
  unknown = sorted(set(cfg) - valid)
  if unknown:
    raise ValueError(f"Unknown key(s) {', '.join(where + '.' + k for k in unknown)} for "
                     f"{cls.__name__}; valid keys: {', '.join(sorted(valid))}")


def build_model(model_cfg: Mapping[str, Any], **overrides) -> nn.Module:
  """Builds `MODELS[model_cfg["name"]]` from the other keys, validating every key first."""
  cfg = dict(model_cfg)
  name = cfg.pop("name", None)
  if name not in MODELS:
    raise ValueError(f"config.model.name={name!r} is not a model; choose one of {sorted(MODELS)}")
  cls = MODELS[name]
  cfg.update(overrides)
  check_fields(cls, cfg, "config.model")
  for (family, field), sub_cls in SUBMODULE_FIELDS.items():
    if family == name and field in cfg:
      cfg[field] = dict(cfg[field])
      check_fields(sub_cls, cfg[field], f"config.model.{field}")
  return cls(**cfg)
