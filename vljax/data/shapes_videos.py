"""Short videos of shapes-world objects moving in straight lines, with motion captions ("the red
circle moves to the right"): the records of the video view. Each record is a pure function of
(split, seed, index, settings) and keeps the world's held-out (colour, shape) pairs out of train.
"""
from __future__ import annotations

import dataclasses
import operator
import types
from typing import Any, SupportsIndex

import numpy as np

from vljax.data import shapes, shapes_qa

# Distinguish this stream from the scene's (no suffix), the siblings' (1), the QA's (2) and the
# conversations' and episodes' (3, 4 in vljax.data.shapes_tasks).
_VIDEO_STREAM = 5

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
    index = shapes.check_index(index, self.num_examples, f"{self.split!r} shapes videos")
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


