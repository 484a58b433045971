"""The model modules. Which one a run builds is its family's (`vljax.families`): there is no
second registry by model name."""
from __future__ import annotations

from vljax.models.coca import CoCa
from vljax.models.text import TextTransformer
from vljax.models.two_tower import TwoTower
from vljax.models.vit import ViT

__all__ = ["CoCa", "TextTransformer", "TwoTower", "ViT"]
