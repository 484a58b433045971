"""Texts of a shapes-world scene: captions, class labels and zero-shot prompts.

The first FULL_CAPTION_TEMPLATES captions name every object's size, colour, shape and position,
so they identify a scene up to rendering jitter (what retrieval needs); the shorter ones name
colours and shapes (and sizes) only, so that a model also learns what an object is wherever it
is (what zero-shot classification from class names needs).
"""
from __future__ import annotations

from typing import Callable, Sequence

from vljax.data import shapes

# Where each grid cell is said to be, in the same order as shapes.POSITIONS.
POSITION_PHRASES: tuple[str, ...] = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)

# COUNT_WORDS[n] names n, for the 1 to GRID_SIZE**2 objects a scene can hold.
COUNT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# CLIP-style prompts for zero-shot classification; "{}" takes a class name such as "red circle".
# No template puts "a" right before the class name, which would read "a orange ...".
GENERIC_TEMPLATES: tuple[str, ...] = (
    "a picture of the {}.",
    "there is one {}.",
    "the {} in the picture.",
    "an image showing one {}.",
    "one {} on a dark background.",
)

# CLIP ensembles prompts per class, some naming nuisance attributes ("a photo of a small {}.");
# so do we, with the sizes.
ZEROSHOT_TEMPLATES: tuple[str, ...] = GENERIC_TEMPLATES + tuple(
    f"a picture of a {size} {{}}." for size in shapes.SIZES)


def position_phrase(obj: shapes.ShapeObject) -> str:
  """Where `obj` is, as a phrase such as "at the top left" or "in the center"."""
  return POSITION_PHRASES[obj.row * shapes.GRID_SIZE + obj.col]


def object_phrase(obj: shapes.ShapeObject) -> str:
  """Every attribute of one object, e.g. "a large red circle at the top left"."""
  return f"a {obj.size} {obj.colour} {obj.shape} {position_phrase(obj)}"


def _located_phrase(obj: shapes.ShapeObject) -> str:
  """The position first, as a terse label, e.g. "top left: a large red circle"."""
  return f"{obj.position}: a {obj.size} {obj.colour} {obj.shape}"


def _join(phrases: Sequence[str]) -> str:
  """Joins phrases as English lists: "a", "a and b", "a, b and c"."""
  if len(phrases) == 1:
    return phrases[0]
  return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _reading_order(scene: shapes.Scene) -> list[shapes.ShapeObject]:
  """The scene's objects from top left to bottom right."""
  return sorted(scene.objects, key=lambda obj: (obj.row, obj.col))


def _count_objects(scene: shapes.Scene) -> str:
  """The number of objects in words, e.g. "one object" or "two objects"."""
  count = len(scene.objects)
  return f"{COUNT_WORDS[count]} object" + ("" if count == 1 else "s")


def _plain(scene: shapes.Scene) -> str:
  return _join([object_phrase(o) for o in _reading_order(scene)]) + "."


def _there_is(scene: shapes.Scene) -> str:
  return "there is " + _join([object_phrase(o) for o in reversed(_reading_order(scene))]) + "."


def _picture_of(scene: shapes.Scene) -> str:
  return "a picture of " + _join([object_phrase(o) for o in _reading_order(scene)]) + "."


def _counted(scene: shapes.Scene) -> str:
  objects = _join([object_phrase(o) for o in _reading_order(scene)])
  return f"{_count_objects(scene)}: {objects}."


def _image_showing(scene: shapes.Scene) -> str:
  objects = _join([object_phrase(o) for o in reversed(_reading_order(scene))])
  return f"an image showing {objects}."


def _in_the_picture(scene: shapes.Scene) -> str:
  objects = _join([object_phrase(o) for o in _reading_order(scene)])
  return f"in the picture, {objects}."


def _what_only(scene: shapes.Scene) -> str:
  """Colours and shapes only, as terse web captions often are ("a red circle and a blue star.")."""
  return _join([f"a {o.colour} {o.shape}" for o in _reading_order(scene)]) + "."


def _sized_only(scene: shapes.Scene) -> str:
  """Sizes, colours and shapes, no positions."""
  return "there is " + _join([f"a {o.size} {o.colour} {o.shape}" for o in _reading_order(scene)]) + "."


def _position_first(scene: shapes.Scene) -> str:
  return _join([_located_phrase(o) for o in _reading_order(scene)]) + "."


# The order of this tuple fixes what `caption(scene, variant)` returns; append, never reorder.
CAPTION_TEMPLATES: tuple[Callable[[shapes.Scene], str], ...] = (
    _plain, _there_is, _picture_of, _counted, _image_showing, _in_the_picture, _position_first,
    _what_only, _sized_only,
)
# Captions of the first FULL_CAPTION_TEMPLATES templates state every attribute; the others leave
# out positions (and sizes), so a model must also know "a red circle" wherever and however large
# it is: what a class-name prompt asks in zero-shot classification.
FULL_CAPTION_TEMPLATES = CAPTION_TEMPLATES.index(_what_only)
NUM_CAPTION_TEMPLATES = len(CAPTION_TEMPLATES)


def caption(scene: shapes.Scene, variant: int) -> str:
  """Caption number `variant` (taken modulo the number of templates) of `scene`."""
  return CAPTION_TEMPLATES[variant % NUM_CAPTION_TEMPLATES](scene)


def captions(scene: shapes.Scene) -> list[str]:
  """Every caption variant of `scene`, e.g. as multiple references for captioning metrics."""
  return [template(scene) for template in CAPTION_TEMPLATES]


def class_names() -> list[str]:
  """The colour x shape class names, "red circle", "red square", ..., in class-id order."""
  return [f"{colour} {shape}" for colour in shapes.COLOURS for shape in shapes.SHAPES]


def class_id(colour: str, shape: str) -> int:
  """The class id of a (colour, shape) pair, its index in `class_names()`."""
  if colour not in shapes.COLOURS:
    raise ValueError(f"Unknown colour {colour!r}; expected one of {tuple(shapes.COLOURS)}.")
  if shape not in shapes.SHAPES:
    raise ValueError(f"Unknown shape {shape!r}; expected one of {shapes.SHAPES}.")
  return list(shapes.COLOURS).index(colour) * len(shapes.SHAPES) + shapes.SHAPES.index(shape)


def label(scene: shapes.Scene) -> int:
  """The class id of a single-object scene's object; -1 for scenes with several objects."""
  if len(scene.objects) != 1:
    return -1
  (obj,) = scene.objects
  return class_id(obj.colour, obj.shape)


def text_corpus(world_seed: int = 0, num_scenes: int = 500) -> list[str]:
  """Deterministic texts to train the shapes tokenizer on: every caption variant of the first
  `num_scenes` train and validation scenes, of one scene per possible object count (so worlds
  with more objects need no other vocabulary), and every class name in every zero-shot prompt.
  """
  texts = []
  for split in shapes.SPLITS:
    world = shapes.ShapesWorld(split=split, seed=world_seed,
                               num_examples=max(num_scenes, 1))
    for index in range(num_scenes):
      texts.extend(captions(world.scene(index)))
  for num_objects in range(1, shapes.GRID_SIZE ** 2 + 1):
    world = shapes.ShapesWorld(split="validation", seed=world_seed, min_objects=num_objects,
                               max_objects=num_objects, num_examples=1)
    texts.extend(captions(world.scene(0)))
  texts.extend(template.format(name) for template in ZEROSHOT_TEMPLATES
               for name in class_names())
  return texts
