"""The shapes world as text only: its captions without images (what a language model trains
on), and the generator's own probability of a caption, which bounds the perplexity any model
can reach on them.

A caption is `captions.caption(scene, variant=index)`: one of NUM_CAPTION_TEMPLATES templates
(by index, so uniform to a reader who does not know the index) over a scene of n objects
(uniform in min..max objects) in distinct cells of the 3x3 grid (a uniform set: captions list
objects in reading order), each with a (colour, shape) pair uniform over the split's pairs and
a size uniform over SIZES, independently. Every template's words tell which template wrote
them, and a full template's caption names every attribute of every object, so

  -log p(caption) = log T + log(#object counts) + log C(9, n) + n log(P * S)   (full)
  -log p(caption) = log T + log(#object counts) + n log P                      (colours, shapes)
  -log p(caption) = log T + log(#object counts) + n log(P * S)                 (sizes too)

with T templates, P pairs and S sizes. Summed over a set of captions and divided by the tokens
a model scores (caption tokens and EOS), it is the entropy floor of a per-token perplexity.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, SupportsIndex

from vljax.data import captions, shapes


@dataclasses.dataclass(frozen=True)
class ShapesCaptions(shapes.ShapesWorld):
  """A split of the shapes world whose examples are {"caption", "label", "index"}, with the
  captions of `ShapesWorld` and no image rendered (the text views read nothing else)."""

  def example(self, index: SupportsIndex) -> dict[str, Any]:
    scene = self.scene(index)
    return {"caption": captions.caption(scene, variant=scene.index),
            "label": captions.label(scene), "index": scene.index}


def caption_nll(world: shapes.ShapesWorld, index: int) -> float:
  """-log p (nats) of caption `index` of `world` under the generator that wrote it (see the
  module docstring); the template counts as uniform."""
  scene = world.scene(index)
  n = len(scene.objects)
  template = scene.index % captions.NUM_CAPTION_TEMPLATES
  pairs, sizes = len(world._pairs), len(shapes.SIZES)  # pylint: disable=protected-access
  nll = (math.log(captions.NUM_CAPTION_TEMPLATES)
         + math.log(world.max_objects - world.min_objects + 1))
  if template < captions.FULL_CAPTION_TEMPLATES:  # every attribute, positions included
    return nll + math.log(math.comb(shapes.GRID_SIZE ** 2, n)) + n * math.log(pairs * sizes)
  if captions.CAPTION_TEMPLATES[template].__name__ == "_what_only":  # colours and shapes
    return nll + n * math.log(pairs)
  return nll + n * math.log(pairs * sizes)  # sizes, colours and shapes
