"""Size presets: one merge of a variant's table entry with a module's explicit size fields."""
from __future__ import annotations

from typing import Any, Mapping, Sequence


def resolve_sizes(module_name: str, variant_sizes: Mapping[str, Any], module: Any,
                  fields: Sequence[str]) -> dict[str, Any]:
  """The variant's sizes, overridden by each of `module`'s `fields` that is not None.

  `variant_sizes` is the decoded table entry of the module's variant ({} without a variant);
  keys it has beyond `fields` are kept. Raises a ValueError naming the first of `fields` that
  neither gives, e.g. "ViT needs 'width': give variant= or width=".
  """
  sizes = dict(variant_sizes)
  for field in fields:
    value = getattr(module, field)
    if value is not None:
      sizes[field] = value
    if field not in sizes:
      raise ValueError(f"{module_name} needs {field!r}: give variant= or {field}=")
  return sizes
