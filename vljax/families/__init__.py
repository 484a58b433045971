"""Model families and their registry (`config.family`); the contract is `vljax.families.base`.

A new family adds a model file (vljax/models/), a family file here (its loss, predict functions
and model fields), a line in FAMILIES, and configs; see the README's worked example.
"""
from __future__ import annotations

from vljax.families import coca, llava, lm, two_tower
from vljax.families.base import (PREDICT_FUNCTIONS, Bound, Family, bind, build_model,
                                 model_config, normalize_images)

__all__ = ["FAMILIES", "PREDICT_FUNCTIONS", "Bound", "Family", "bind", "build_model",
           "get_family", "model_config", "normalize_images"]

FAMILIES: dict[str, Family] = {family.name: family for family in (
    two_tower.FAMILY, coca.FAMILY, lm.LM_FAMILY, lm.T5_FAMILY, llava.FAMILY)}


def get_family(name: str) -> Family:
  if name not in FAMILIES:
    raise ValueError(f"config.family={name!r}; choose one of {sorted(FAMILIES)}")
  return FAMILIES[name]
