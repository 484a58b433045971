"""Records of the shapes world for every view: grounding regions, LLaVA conversations and few-shot
episodes (videos: `vljax.data.shapes_videos`).

Sources yield records and views (`vljax.data.views`) turn them into token sequences. Each record
is a pure function of (split, seed, index, settings), built from the scenes of `ShapesWorld`
with the same held-out (colour, shape) pairs, so a training record never shows or names a pair
that only validation holds. Texts are lower-case words and punctuation (VQA count answers
aside, which are digits as in VQAv2); `text_corpus` lists them for the tokenizer.
"""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, SupportsIndex

import numpy as np

from vljax.data import captions, shapes, shapes_qa
from vljax.data.shapes_videos import MAX_VIDEO_OBJECTS, ShapesVideos

__all__ = ["MAX_VIDEO_OBJECTS", "ShapesVideos"]  # re-exported: every view's records from here

# Distinguish these streams from the scene's (no suffix), the siblings' (1) and the QA's (2).
_CONVERSATION_STREAM = 3
_EPISODE_STREAM = 4

NUM_ANSWERS = 10  # Answers per question, as the ten human answers of VQAv2.

# ----------------------------------------------------------------------------------------------
# Referring expressions and regions.

# Attribute sets an object can be named by, for questions that must not name what they ask.
_NAMINGS: tuple[tuple[str, ...], ...] = (
    ("colour", "shape"), ("shape",), ("colour",), ("size", "shape"), ("size", "colour"),
    ("size", "colour", "shape"), ("shape", "position"), ("colour", "shape", "position"),
    ("position",))
# How grounding phrases name an object: the first of these that singles it out. An object's
# cell is its own, so the last always does.
_PHRASE_NAMINGS: tuple[tuple[str, ...], ...] = (
    ("colour", "shape"), ("size", "colour", "shape"), ("colour", "shape", "position"))


def _key(obj: shapes.ShapeObject, naming: tuple[str, ...]) -> tuple[Any, ...]:
  """What `naming` says of `obj`; two objects with equal keys are confused by it."""
  return tuple((obj.row, obj.col) if name == "position" else getattr(obj, name)
               for name in naming)


def _is_unique(scene: shapes.Scene, obj: shapes.ShapeObject, naming: tuple[str, ...]) -> bool:
  key = _key(obj, naming)
  return sum(_key(other, naming) == key for other in scene.objects) == 1


def _named(obj: shapes.ShapeObject, naming: tuple[str, ...]) -> str:
  """The object by `naming`: "the red circle", "the small object", "the star on the left"."""
  words = [getattr(obj, name) for name in ("size", "colour", "shape") if name in naming]
  if "shape" not in naming:
    words.append("object")
  if "position" in naming:
    words.append(captions.position_phrase(obj))
  return "the " + " ".join(words)


def referring_expression(scene: shapes.Scene, obj: shapes.ShapeObject) -> str:
  """The shortest of "the red circle", "the large red circle", "the red circle on the left"
  that picks `obj` out of `scene` alone."""
  for naming in _PHRASE_NAMINGS:
    if _is_unique(scene, obj, naming):
      return _named(obj, naming)
  raise ValueError(f"{obj} is not in its scene's own grid cell; is it part of {scene}?")


def region_box(obj: shapes.ShapeObject, image_size: int) -> tuple[float, float, float, float]:
  """(x1, y1, x2, y2) of `obj`, fractions of the side: its outline's extent rounded outward to
  the supersampled canvas `render_scene` paints on, so it is the box of the painted sub-pixels."""
  canvas_size = image_size * shapes.SUPERSAMPLE
  x1, y1, x2, y2 = shapes.object_box(obj, canvas_size)
  box = (math.floor(x1), math.floor(y1), math.ceil(x2), math.ceil(y2))
  return tuple(min(max(v / canvas_size, 0.0), 1.0) for v in box)


def regions(scene: shapes.Scene, image_size: int) -> list[dict[str, Any]]:
  """One {"phrase", "box"} per object in reading order; the box is (x1, y1, x2, y2) in fractions
  of an `image_size` image's width and height (x right, y down), tight about the drawn pixels."""
  return [{"phrase": referring_expression(scene, obj), "box": region_box(obj, image_size)}
          for obj in sorted(scene.objects, key=lambda o: (o.row, o.col))]


# ----------------------------------------------------------------------------------------------
# Conversations (LLaVA's JSON format).

DESCRIBE_PROMPTS: tuple[str, ...] = (
    "describe the picture.", "what is in this image?", "what do you see in the picture?",
    "give a short description of the image.", "describe the scene.")
_ATTRIBUTE_QUESTIONS: types.MappingProxyType[str, str] = types.MappingProxyType({
    "colour": "what colour is {}?", "shape": "what shape is {}?",
    "size": "is {} small or large?", "position": "where is {}?"})


def _answer_attribute(obj: shapes.ShapeObject, reference: str, attribute: str) -> str:
  if attribute == "shape":
    return f"{reference} is a {obj.shape}."
  if attribute == "position":
    return f"{reference} is {captions.position_phrase(obj)}."
  return f"{reference} is {getattr(obj, attribute)}."


def _object_rounds(scene: shapes.Scene
                   ) -> list[tuple[shapes.ShapeObject, str, list[tuple[str, ...]]]]:
  """Every (object, attribute) a round can ask about, with the namings that single the object
  out without naming the attribute; objects in reading order, pairs without a naming dropped."""
  objects = sorted(scene.objects, key=lambda o: (o.row, o.col))
  unique: list[list[tuple[str, ...]]] = [[] for _ in objects]
  for naming in _NAMINGS:
    keys = [_key(obj, naming) for obj in objects]
    for namings, key in zip(unique, keys):
      if keys.count(key) == 1:
        namings.append(naming)
  rounds = []
  for obj, namings in zip(objects, unique):
    for attribute in _ATTRIBUTE_QUESTIONS:
      allowed = [naming for naming in namings if attribute not in naming]
      if allowed:
        rounds.append((obj, attribute, allowed))
  return rounds


def _compare(a: shapes.ShapeObject, b: shapes.ShapeObject, name_a: str, name_b: str,
             kind: str) -> tuple[str, str]:
  """A question comparing a with b, and its answer."""
  if kind in ("bigger", "smaller"):
    question = f"is {name_a} {kind} than {name_b}?"
    if a.size == b.size:
      return question, "no, they are the same size."
    a_bigger = a.size == "large"
    relation = "bigger" if a_bigger else "smaller"
    return question, f"{'yes' if relation == kind else 'no'}, {name_a} is {relation} than {name_b}."
  first = {"further left": a.col < b.col, "further right": a.col > b.col,
           "higher up": a.row < b.row, "lower down": a.row > b.row}[kind]
  return (f"which is {kind}, {name_a} or {name_b}?",
          f"{name_a if first else name_b} is {kind}.")


def _comparisons(scene: shapes.Scene
                 ) -> list[tuple[shapes.ShapeObject, shapes.ShapeObject, str]]:
  """Every (a, b, kind) comparison of two objects by size, or by place where they differ."""
  result = []
  for a in scene.objects:
    for b in scene.objects:
      if a is not b:
        result.extend((a, b, kind) for kind in ("bigger", "smaller"))
        if a.col != b.col:
          result.extend((a, b, kind) for kind in ("further left", "further right"))
        if a.row != b.row:
          result.extend((a, b, kind) for kind in ("higher up", "lower down"))
  return result


def conversation(scene: shapes.Scene, index: int, seed: int = 0) -> list[dict[str, str]]:
  """Conversation number `index` about `scene`: a pure function of (scene, index, seed).

  2 or 3 rounds ({"from": "human"} then {"from": "gpt"}), each one of: describe the picture (a
  caption), ask about one object's colour, shape, size or position, or compare two objects'
  sizes or places (not in single-object scenes). The first human turn starts with "<image>\\n".
  """
  if index < 0 or seed < 0:
    raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}.")
  rng = np.random.default_rng(np.random.SeedSequence(
      [seed, shapes.split_seed_id(scene.split), scene.index, _CONVERSATION_STREAM, index]))
  num_rounds = 2 + int(rng.integers(2))
  kinds = ["describe", "object"] + (["compare"] if len(scene.objects) > 1 else [])
  kinds = [kinds[int(i)] for i in rng.permutation(len(kinds))][:num_rounds]
  kinds += ["object"] * (num_rounds - len(kinds))
  object_rounds = _object_rounds(scene)
  # Distinct (object, attribute) in each object round, built lazily: records must be cheap.
  asked = iter(rng.permutation(len(object_rounds)))
  turns = []
  for kind in kinds:
    if kind == "describe":
      question = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
      answer = captions.caption(scene, variant=int(rng.integers(captions.NUM_CAPTION_TEMPLATES)))
    elif kind == "object":
      obj, attribute, namings = object_rounds[int(next(asked))]
      reference = _named(obj, namings[int(rng.integers(len(namings)))])
      question = _ATTRIBUTE_QUESTIONS[attribute].format(reference)
      answer = _answer_attribute(obj, reference, attribute)
    else:
      comparisons = _comparisons(scene)
      a, b, relation = comparisons[int(rng.integers(len(comparisons)))]
      question, answer = _compare(a, b, referring_expression(scene, a),
                                  referring_expression(scene, b), relation)
    turns.append({"from": "human", "value": ("<image>\n" if not turns else "") + question})
    turns.append({"from": "gpt", "value": answer})
  return turns


def scene_annotations(scene: shapes.Scene, *, seed: int, image_size: int,
                      held_out: tuple[tuple[str, str], ...] = shapes.HELD_OUT
                      ) -> dict[str, Any]:
  """The extra fields of a `ShapesWorld(annotations=True)` example: question, answers (10, as in
  VQAv2), question_type, conversations and regions; question and conversation number 0."""
  qa = shapes_qa.sample_question(scene, 0, seed, held_out=held_out)
  return {"question": qa.question, "answers": [qa.answer] * NUM_ANSWERS,
          "question_type": qa.question_type, "conversations": conversation(scene, 0, seed),
          "regions": regions(scene, image_size)}


# ----------------------------------------------------------------------------------------------
# Interleaved few-shot episodes.

EPISODE_TASKS: tuple[str, ...] = ("caption", "vqa")


@dataclasses.dataclass(frozen=True)
class ShapesEpisodes:
  """Few-shot episodes as a random-access source: `shots` solved examples, then a query.

  Episode i's query is scene i of `ShapesWorld(split, seed, ...)` and its solved examples are
  other scenes of the same split, so held-out pairs stay in validation. Each scene is solved
  as `ShapesWorld` annotates it: caption number `scene.index`, or question number 0.
  """

  split: str = "train"  # "train" or "validation".
  seed: int = 0  # World seed, as ShapesWorld's.
  shots: int = 2  # Solved examples before the query.
  task: str = "caption"  # "caption" (empty prompt, a caption) or "vqa" (question, short answer).
  image_size: int = 64  # Side of the rendered images, in pixels.
  num_examples: int | None = None  # Episodes; None: as ShapesWorld (100_000 / 10_000).
  min_objects: int = 1  # Fewest objects in a scene.
  max_objects: int = 3  # Most objects in a scene.
  held_out: tuple[tuple[str, str], ...] = shapes.HELD_OUT  # Pairs absent from train.
  _world: shapes.ShapesWorld = dataclasses.field(
      init=False, repr=False, compare=False)  # The scenes: at least the split's default many.

  def __post_init__(self):
    if self.task not in EPISODE_TASKS:
      raise ValueError(f"Unknown task {self.task!r}; expected one of {EPISODE_TASKS}.")
    if self.shots < 0:
      raise ValueError(f"shots must be non-negative, got {self.shots}.")
    shapes.split_seed_id(self.split)
    num_examples = self.num_examples
    if num_examples is None:
      num_examples = shapes.DEFAULT_NUM_EXAMPLES[self.split]
    if num_examples < 1:
      raise ValueError(f"num_examples must be positive, got {num_examples}.")
    world = shapes.ShapesWorld(
        split=self.split, seed=self.seed, image_size=self.image_size,
        min_objects=self.min_objects, max_objects=self.max_objects, held_out=self.held_out,
        num_examples=max(num_examples, shapes.DEFAULT_NUM_EXAMPLES[self.split], self.shots + 1))
    object.__setattr__(self, "num_examples", num_examples)
    object.__setattr__(self, "held_out", world.held_out)
    object.__setattr__(self, "_world", world)

  def __len__(self) -> int:
    return self.num_examples

  def scene_indices(self, index: SupportsIndex) -> list[int]:
    """The world indices of episode `index`'s scenes: `shots` distinct others, then `index`."""
    index = shapes.check_index(index, self.num_examples, f"{self.split!r} shapes episodes")
    rng = np.random.default_rng(np.random.SeedSequence(
        [self.seed, shapes.split_seed_id(self.split), index, _EPISODE_STREAM]))
    chosen: list[int] = []
    while len(chosen) < self.shots:  # rejection: O(shots), unlike a permutation of the pool
      other = int(rng.integers(len(self._world)))
      if other != index and other not in chosen:
        chosen.append(other)
    return chosen + [index]

  def solve(self, scene: shapes.Scene) -> tuple[str, str, list[str]]:
    """(prompt, answer, the 10 answers a prediction is scored against) for one scene."""
    if self.task == "vqa":
      qa = shapes_qa.sample_question(scene, 0, self.seed, held_out=self.held_out)
      return qa.question, qa.answer, [qa.answer] * NUM_ANSWERS
    # Every caption variant, starting with the one given as the answer, cycled to ten.
    variants = captions.captions(scene)
    first = scene.index % len(variants)
    references = variants[first:] + variants[:first]
    return "", references[0], [references[i % len(references)] for i in range(NUM_ANSWERS)]

  def example(self, index: SupportsIndex) -> dict[str, Any]:
    """{"images": uint8 [shots + 1, H, W, 3], "prompts", "answers", "answer_lists", "index"}."""
    scenes = [self._world.scene(i) for i in self.scene_indices(index)]
    solved = [self.solve(scene) for scene in scenes]
    return {"images": np.stack([self._world.render(scene) for scene in scenes]),
            "prompts": [prompt for prompt, _, _ in solved],
            "answers": [answer for _, answer, _ in solved],
            "answer_lists": [answers for _, _, answers in solved],
            "index": scenes[-1].index}

  def __getitem__(self, index: SupportsIndex) -> dict[str, Any]:
    return self.example(index)


# ----------------------------------------------------------------------------------------------
# Tokenizer corpus.


def _scene_texts(scene: shapes.Scene, seed: int, *, all_captions: bool) -> list[str]:
  """Three conversations' turns (without "<image>"), the grounding phrases, and the caption and
  question episodes solve the scene with (or every caption variant)."""
  texts = [turn["value"].removeprefix("<image>\n")
           for number in range(3) for turn in conversation(scene, number, seed)]
  texts.extend(referring_expression(scene, obj) for obj in scene.objects)
  qa = shapes_qa.sample_question(scene, 0, seed)
  texts.extend((qa.question, qa.answer))
  if all_captions:
    texts.extend(captions.captions(scene))
  else:
    texts.append(captions.caption(scene, variant=scene.index))
  return texts


def text_corpus(world_seed: int = 0, num_scenes: int = 300) -> list[str]:
  """Deterministic, distinct texts of these tasks for training the shapes tokenizer.

  The texts of the first `num_scenes` scenes of each split (conversations, grounding phrases,
  episode prompts and answers), of a few scenes of every object count up to nine with every
  caption variant (so larger worlds need no other words), every VQA question and answer of a
  tenth as many scenes (`shapes_qa.text_corpus`), and the captions of `num_scenes` videos of up
  to three objects per split.
  """
  texts: list[str] = []
  for split in shapes.SPLITS:
    world = shapes.ShapesWorld(split=split, seed=world_seed, num_examples=max(num_scenes, 1))
    for index in range(num_scenes):
      texts.extend(_scene_texts(world.scene(index), world_seed, all_captions=False))
    per_count = max(num_scenes // 50, 1)
    for count in range(1, shapes.GRID_SIZE ** 2 + 1):
      world = shapes.ShapesWorld(split=split, seed=world_seed, min_objects=count,
                                 max_objects=count, num_examples=per_count)
      for index in range(per_count):
        texts.extend(_scene_texts(world.scene(index), world_seed, all_captions=True))
    videos = ShapesVideos(split=split, seed=world_seed, max_objects=MAX_VIDEO_OBJECTS,
                          num_examples=max(num_scenes, 1))
    texts.extend(videos.caption(index) for index in range(num_scenes))
  # Every question (count questions about each colour, shape and size included) and answer.
  texts.extend(shapes_qa.text_corpus(world_seed, num_scenes=max(num_scenes // 10, 1)))
  return list(dict.fromkeys(texts))
