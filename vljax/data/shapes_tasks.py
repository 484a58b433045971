"""Records of the shapes world for every view: grounding regions, LLaVA conversations, few-shot
episodes and short videos.

Sources yield records and views (`vljax.data.views`) turn them into token sequences. Each record
is a pure function of (split, seed, index, settings), built from the scenes of `ShapesWorld`
with the same held-out (colour, shape) pairs, so a training record never shows or names a pair
that only validation holds. Texts are lower-case words and punctuation (VQA count answers
aside, which are digits as in VQAv2); `text_corpus` lists them for the tokenizer.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import types
from typing import Any, SupportsIndex

import numpy as np

from vljax.data import captions, shapes, shapes_qa

# Distinguish these streams from the scene's (no suffix), the siblings' (1) and the QA's (2).
_CONVERSATION_STREAM = 3
_EPISODE_STREAM = 4
_VIDEO_STREAM = 5

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


def _check_index(index: SupportsIndex, length: int, what: str) -> int:
  index = operator.index(index)
  if not 0 <= index < length:
    raise IndexError(f"Index {index} is out of range for {what} of {length} records.")
  return index


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
    index = _check_index(index, self.num_examples, f"{self.split!r} shapes episodes")
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
# Short videos of moving objects.

DIRECTIONS: tuple[str, ...] = ("right", "left", "up", "down", "still")
_STEPS: types.MappingProxyType[str, tuple[int, int]] = types.MappingProxyType({
    "right": (1, 0), "left": (-1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)})
MOTION_PHRASES: types.MappingProxyType[str, str] = types.MappingProxyType({
    "right": "moves to the right", "left": "moves to the left", "up": "moves up",
    "down": "moves down", "still": "stays still"})
MAX_VIDEO_OBJECTS = 3


def _tracks(direction: str) -> tuple[tuple[tuple[int, int], ...], ...]:
  """The runs of 2 or 3 grid cells (row, col) an object moving in `direction` may cover, in the
  order it covers them; a single cell for "still"."""
  n = shapes.GRID_SIZE
  if direction == "still":
    return tuple(((row, col),) for row in range(n) for col in range(n))
  dx, dy = _STEPS[direction]
  tracks = []
  for line in range(n):
    for length in range(2, n + 1):
      for first in range(n - length + 1):
        run = [first + k for k in range(length)]
        run = run if dx + dy > 0 else run[::-1]
        tracks.append(tuple((line, k) if dx else (k, line) for k in run))
  return tuple(tracks)


_TRACKS: types.MappingProxyType[str, tuple[tuple[tuple[int, int], ...], ...]] = (
    types.MappingProxyType({direction: _tracks(direction) for direction in DIRECTIONS}))


@dataclasses.dataclass(frozen=True)
class Motion:
  """One object of a video: how it looks and where its centre is, in cells from the image's top
  left, in the first and the last frame; it moves in a straight line at constant speed."""

  obj: shapes.ShapeObject  # Appearance (shape, colour, size, brightness); cell unused.
  direction: str  # One of DIRECTIONS.
  start: tuple[float, float]  # (x, y) centre in the first frame, in cells.
  end: tuple[float, float]  # (x, y) centre in the last frame, in cells.

  def at(self, fraction: float) -> shapes.ShapeObject:
    """The object a `fraction` (0 to 1) of the way, placed by cell and offset for rendering."""
    x = self.start[0] + (self.end[0] - self.start[0]) * fraction
    y = self.start[1] + (self.end[1] - self.start[1]) * fraction
    row, col = min(int(y), shapes.GRID_SIZE - 1), min(int(x), shapes.GRID_SIZE - 1)
    return dataclasses.replace(self.obj, row=row, col=col, offset_x=x - col - 0.5,
                               offset_y=y - row - 0.5)


def _motion_caption(motions: tuple[Motion, ...]) -> str:
  """"the red circle moves to the right and the blue star moves up." (pairs are distinct)."""
  phrases = [f"the {m.obj.colour} {m.obj.shape} {MOTION_PHRASES[m.direction]}" for m in motions]
  if len(phrases) == 1:
    return phrases[0] + "."
  return ", ".join(phrases[:-1]) + " and " + phrases[-1] + "."


@dataclasses.dataclass(frozen=True)
class ShapesVideos:
  """Videos of 1-3 shapes, each moving in a straight line (right, left, up or down; one may stay
  still), as a random-access source: index -> {"frames", "caption", "index"}.

  Objects have distinct (colour, shape) pairs, drawn as `ShapesWorld` draws them (held-out
  pairs only in validation), cross grid cells of their own (so they never touch), and are
  painted by `render_scene`, frame by frame.
  """

  split: str = "train"  # "train" or "validation".
  seed: int = 0  # World seed.
  frames: int = 4  # Frames per video, at least 2; objects cover their path from first to last.
  image_size: int = 64  # Side of the frames, in pixels.
  num_examples: int | None = None  # Videos; None: as ShapesWorld (100_000 / 10_000).
  min_objects: int = 1  # Fewest objects in a video.
  max_objects: int = 2  # Most objects in a video (at most MAX_VIDEO_OBJECTS).
  held_out: tuple[tuple[str, str], ...] = shapes.HELD_OUT  # Pairs absent from train.

  def __post_init__(self):
    shapes.split_seed_id(self.split)
    held_out = shapes.validate_pairs(self.held_out)
    if self.frames < 2:
      raise ValueError(f"frames must be at least 2 to show motion, got {self.frames}.")
    if not 1 <= self.min_objects <= self.max_objects <= MAX_VIDEO_OBJECTS:
      raise ValueError(f"Need 1 <= min_objects <= max_objects <= {MAX_VIDEO_OBJECTS}, got "
                       f"min_objects={self.min_objects}, max_objects={self.max_objects}.")
    if len(shapes_qa.allowed_pairs(self.split, held_out)) < self.max_objects:
      raise ValueError("held_out leaves fewer (colour, shape) pairs than max_objects.")
    if self.image_size < shapes.GRID_SIZE * 4:
      raise ValueError(f"image_size={self.image_size} is too small to draw shapes.")
    num_examples = self.num_examples
    if num_examples is None:
      num_examples = shapes.DEFAULT_NUM_EXAMPLES[self.split]
    if num_examples < 1:
      raise ValueError(f"num_examples must be positive, got {num_examples}.")
    object.__setattr__(self, "held_out", held_out)
    object.__setattr__(self, "num_examples", num_examples)

  def __len__(self) -> int:
    return self.num_examples

  def motions(self, index: SupportsIndex) -> tuple[Motion, ...]:
    """The objects of video `index` and their paths, in reading order of the first frame.

    Each object covers its own run of 2 or 3 grid cells in a row (moving left or right) or a
    column (up or down), or one cell (still), jittered within its cells as scene objects are:
    objects never share a cell, so they never touch in any frame.
    """
    index = _check_index(index, self.num_examples, f"{self.split!r} shapes videos")
    rng = np.random.default_rng(np.random.SeedSequence(
        [self.seed, shapes.split_seed_id(self.split), index, _VIDEO_STREAM]))
    pairs = shapes_qa.allowed_pairs(self.split, self.held_out)
    count = int(rng.integers(self.min_objects, self.max_objects + 1))
    used: set[tuple[int, int]] = set()
    allow_still = count > 1  # at most one object stays still, and never a lone one
    motions = []
    for pair_id in rng.choice(len(pairs), size=count, replace=False):
      colour, shape = pairs[int(pair_id)]
      size = shapes.SIZES[int(rng.integers(len(shapes.SIZES)))]
      options = {direction: [track for track in _TRACKS[direction] if used.isdisjoint(track)]
                 for direction in DIRECTIONS if direction != "still" or allow_still}
      # Three runs of at least two cells always leave two free neighbours for a third.
      directions = [direction for direction, tracks in options.items() if tracks]
      direction = directions[int(rng.integers(len(directions)))]
      track = options[direction][int(rng.integers(len(options[direction])))]
      used.update(track)
      allow_still = allow_still and direction != "still"
      max_offset = shapes.MAX_OFFSET_FRACTION * (1.0 - shapes.SIZE_TO_CELL_FRACTION[size]) / 2
      along, across = rng.uniform(-max_offset, max_offset, size=(2, 2))
      (row0, col0), (row1, col1) = track[0], track[-1]
      if row0 == row1:  # horizontal (or still): one height for the whole path
        start = (col0 + 0.5 + along[0], row0 + 0.5 + across[0])
        end = (col1 + 0.5 + (along[1] if col1 != col0 else along[0]), row1 + 0.5 + across[0])
      else:
        start = (col0 + 0.5 + across[0], row0 + 0.5 + along[0])
        end = (col1 + 0.5 + across[0], row1 + 0.5 + along[1])
      obj = shapes.ShapeObject(shape=shape, colour=colour, size=size, row=row0, col=col0,
                               brightness=float(rng.uniform(*shapes.BRIGHTNESS_RANGE)))
      motions.append(Motion(obj, direction, tuple(map(float, start)), tuple(map(float, end))))
    return tuple(sorted(motions, key=lambda m: (int(m.start[1]), m.start[0])))

  def example(self, index: SupportsIndex) -> dict[str, Any]:
    """{"frames": uint8 [frames, H, W, 3], "caption": the motion of every object, "index"}."""
    motions = self.motions(index)
    index = operator.index(index)
    frames = []
    for t in range(self.frames):
      objects = tuple(motion.at(t / (self.frames - 1)) for motion in motions)
      frames.append(shapes.render_scene(shapes.Scene(objects, index=index, split=self.split),
                                        self.image_size))
    return {"frames": np.stack(frames), "caption": _motion_caption(motions), "index": index}

  def caption(self, index: SupportsIndex) -> str:
    """The caption of video `index`, without rendering its frames."""
    return _motion_caption(self.motions(index))

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
