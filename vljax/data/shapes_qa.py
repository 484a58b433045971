"""VQA question/answer pairs about a shapes-world scene, deterministic and random-access.

Question types (the `QA.question_type` names, also the suffixes of "vqa/accuracy/<type>"):
  colour     "what colour is the circle?", "what colour is the object at the top left?"
  shape      "what shape is the red object?"
  size       "what size is the red circle?"                     -> "small" / "large"
  count      "how many objects are there?", "how many red objects are there?", "how many
             crosses are there?"                                -> "0" .. "9"
  position   "where is the red circle?"                         -> "top left", "center", ...
  existence  "is there a blue star?"                            -> "yes" / "no"

Every question is unambiguous: an object is named only by attributes that single it out in the
scene ("the circle" only when there is one circle), never by the attribute asked about. Answers
are short, lower-case and already in the normal form of `vljax.evals.vqa.normalize_answer`
(counts as digits). Held-out (colour, shape) pairs never appear in a training-split question or
answer: objects of a training scene never have them, and "no" existence questions name only
pairs of the scene's split (every pair in validation, the held-out ones included).

The answers' vocabulary (digits, "yes", "?") is not in `captions.text_corpus`, which the existing
shapes tokenizer is trained on; `text_corpus` here lists the extra texts a VQA tokenizer needs.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import numpy as np

from vljax.data import shapes, captions

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "size", "count", "position", "existence")

_PLURALS: dict[str, str] = {shape: shape + ("es" if shape.endswith("s") else "s")
                            for shape in shapes.SHAPES}

# Distinguishes the question stream from the scene's and siblings' streams in SeedSequence.
_QA_STREAM = 2


@dataclasses.dataclass(frozen=True)
class QA:
  """One question about a scene and its answer."""

  question: str  # E.g. "what colour is the circle?".
  answer: str  # Short, lower-case and normalised, e.g. "red", "2", "top left", "yes".
  question_type: str  # One of QUESTION_TYPES.
  yes_no: bool  # Whether the answer is "yes" or "no".


def allowed_pairs(split: str, held_out: Iterable[tuple[str, str]] = shapes.HELD_OUT
                  ) -> tuple[tuple[str, str], ...]:
  """The (colour, shape) pairs a scene of `split` may show, as `ShapesWorld` samples them."""
  return _allowed_pairs(split, shapes.validate_pairs(held_out))


@functools.lru_cache(maxsize=64)
def _allowed_pairs(split: str, held_out: tuple[tuple[str, str], ...]
                   ) -> tuple[tuple[str, str], ...]:
  shapes.split_seed_id(split)
  pairs = tuple((c, s) for c in shapes.COLOURS for s in shapes.SHAPES)
  if split == "train":
    pairs = tuple(p for p in pairs if p not in held_out)
  return pairs


def _check_scene(scene: shapes.Scene, pairs: tuple[tuple[str, str], ...]) -> None:
  for obj in scene.objects:
    if (obj.colour, obj.shape) not in pairs:
      raise ValueError(
          f"A {scene.split!r} scene holds a {obj.colour} {obj.shape}, a pair held out of that "
          "split; pass shapes_qa the held_out of the ShapesWorld the scene comes from.")


# Attributes an object can be named by, and how a reference built from them reads.
_NAMINGS: tuple[tuple[str, ...], ...] = (
    ("shape",), ("colour", "shape"), ("colour",), ("size", "shape"), ("size", "colour"),
    ("size", "colour", "shape"), ("position",))
_ATTRIBUTE_TEMPLATES: dict[str, str] = {
    "colour": "what colour is the {}?", "shape": "what shape is the {}?",
    "size": "what size is the {}?", "position": "where is the {}?"}


def _attributes(scene: shapes.Scene) -> list[tuple[shapes.ShapeObject, dict[str, str]]]:
  """The scene's objects in reading order, each with its nameable attributes."""
  return [(obj, {"colour": obj.colour, "shape": obj.shape, "size": obj.size,
                 "position": obj.position})
          for obj in sorted(scene.objects, key=lambda o: (o.row, o.col))]


def _reference(obj: shapes.ShapeObject, attributes: dict[str, str],
               naming: tuple[str, ...]) -> str:
  """The words after "the": "circle", "red object", "small red circle", "object on the left"."""
  if naming == ("position",):
    return f"object {captions.position_phrase(obj)}"
  words = [attributes[name] for name in naming]
  if "shape" not in naming:
    words.append("object")
  return " ".join(words)


def _attribute_questions(scene: shapes.Scene, asked: str) -> list[QA]:
  """Every question asking for the `asked` attribute of an object, naming the object by each
  combination of other attributes that singles it out in the scene."""
  objects = _attributes(scene)
  result = []
  for naming in _NAMINGS:
    if asked in naming:
      continue
    keys = [tuple(attributes[name] for name in naming) for _, attributes in objects]
    for (obj, attributes), key in zip(objects, keys):
      if keys.count(key) == 1:
        reference = _reference(obj, attributes, naming)
        result.append(QA(_ATTRIBUTE_TEMPLATES[asked].format(reference), attributes[asked],
                         asked, False))
  return result


def _count_questions(scene: shapes.Scene) -> list[QA]:
  """How many objects, and how many of each colour, shape and size ("0" included)."""
  def count(noun: str, number: int) -> QA:
    return QA(f"how many {noun} are there?", str(number), "count", False)

  colours = [o.colour for o in scene.objects]
  shape_names = [o.shape for o in scene.objects]
  sizes = [o.size for o in scene.objects]
  return ([count("objects", len(scene.objects))]
          + [count(f"{c} objects", colours.count(c)) for c in shapes.COLOURS]
          + [count(_PLURALS[s], shape_names.count(s)) for s in shapes.SHAPES]
          + [count(f"{s} objects", sizes.count(s)) for s in shapes.SIZES])


def _open_questions(scene: shapes.Scene, question_type: str) -> list[QA]:
  if question_type == "count":
    return _count_questions(scene)
  return _attribute_questions(scene, question_type)


def _existence(colour: str, shape: str, present: bool) -> QA:
  article = "an" if colour[0] in "aeiou" else "a"
  return QA(f"is there {article} {colour} {shape}?", "yes" if present else "no", "existence", True)


def _present_pairs(scene: shapes.Scene) -> list[tuple[str, str]]:
  return sorted({(o.colour, o.shape) for o in scene.objects})


def questions(scene: shapes.Scene, rng: np.random.Generator, *,
              held_out: Iterable[tuple[str, str]] = shapes.HELD_OUT) -> list[QA]:
  """Every question about `scene`, with existence questions balanced between yes and no.

  All colour, shape, size and position questions (one per object and unambiguous reference),
  count questions for all objects and for every colour, shape and size (answers "0" included),
  a "yes" existence question per (colour, shape) pair present and as many "no" ones about pairs
  absent from the scene, drawn by `rng` from the pairs of the scene's split. The order is fixed
  (by type, then objects in reading order); only the "no" pairs depend on `rng`.
  """
  pairs = allowed_pairs(scene.split, held_out)
  _check_scene(scene, pairs)
  result = [qa for question_type in QUESTION_TYPES[:-1]
            for qa in _open_questions(scene, question_type)]
  present = _present_pairs(scene)
  absent = [pair for pair in pairs if pair not in present]
  result.extend(_existence(c, s, True) for c, s in present)
  chosen = rng.choice(len(absent), size=min(len(present), len(absent)), replace=False)
  result.extend(_existence(*absent[int(i)], False) for i in sorted(chosen))
  return result


def sample_question(scene: shapes.Scene, index: int, seed: int = 0, *,
                    held_out: Iterable[tuple[str, str]] = shapes.HELD_OUT) -> QA:
  """Question number `index` about `scene`: a pure function of (scene, index, seed).

  The type is drawn uniformly from those the scene has a question of (all six, unless identical
  objects leave no unambiguous position question), then a question of that type uniformly; an
  existence question is "yes" or "no" with probability 1/2, about a pair present in the scene or
  one of the split's pairs absent from it. Random-access, so a grain pipeline may ask for any
  (scene, index) in any order, on any host.
  """
  if index < 0 or seed < 0:
    raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}.")
  pairs = allowed_pairs(scene.split, held_out)
  _check_scene(scene, pairs)
  rng = np.random.default_rng(np.random.SeedSequence(
      [seed, shapes.split_seed_id(scene.split), scene.index, _QA_STREAM, index]))
  # Only position questions can be missing: objects identical in size, colour and shape can be
  # told apart by their place alone (and any object another naming singles out, this one does).
  looks = [(o.size, o.colour, o.shape) for o in scene.objects]
  has_position = any(looks.count(look) == 1 for look in looks)
  types = [t for t in QUESTION_TYPES if t != "position" or has_position]
  question_type = types[int(rng.integers(len(types)))]
  if question_type != "existence":
    candidates = _open_questions(scene, question_type)
    return candidates[int(rng.integers(len(candidates)))]
  present = _present_pairs(scene)
  if present and rng.random() < 0.5:
    return _existence(*present[int(rng.integers(len(present)))], True)
  absent = [pair for pair in pairs if pair not in present]
  return _existence(*absent[int(rng.integers(len(absent)))], False)


def text_corpus(world_seed: int = 0, num_scenes: int = 200) -> list[str]:
  """Deterministic question and answer texts of the first `num_scenes` scenes of each split,
  plus every possible answer, for training a tokenizer that covers the VQA view."""
  texts = []
  for split in shapes.SPLITS:
    world = shapes.ShapesWorld(split=split, seed=world_seed, num_examples=max(num_scenes, 1))
    for index in range(num_scenes):
      scene = world.scene(index)
      rng = np.random.default_rng([world_seed, shapes.split_seed_id(split), index, _QA_STREAM])
      for qa in questions(scene, rng, held_out=world.held_out):
        texts.extend((qa.question, qa.answer))
  answers = [*shapes.COLOURS, *shapes.SHAPES, *shapes.SIZES, *shapes.POSITIONS, "yes", "no"]
  texts.extend(answers + [str(n) for n in range(shapes.GRID_SIZE ** 2 + 1)])
  return texts
