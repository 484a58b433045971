"""The shapes world: a deterministic, random-access generator of small synthetic RGB scenes.

Each scene holds 1-3 coloured shapes on a dark background, one per cell of a 3x3 grid. A scene is
a pure function of (seed, split, index), so any example can be produced on any host without
state, which is what grain's random-access sources and exact resume need. This module samples
and renders scenes; `vljax.data.captions` turns a scene into text (captions, labels, ...).
"""
from __future__ import annotations

import dataclasses
import math
import operator
import types
from typing import Any, SupportsIndex

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star", "cross")

# Saturated hues that stay apart from each other (and from the background) in RGB space.
COLOURS: types.MappingProxyType[str, tuple[int, int, int]] = types.MappingProxyType({
    "red": (225, 30, 50),
    "green": (40, 190, 60),
    "blue": (40, 90, 250),
    "yellow": (245, 235, 50),
    "purple": (170, 50, 220),
    "orange": (255, 135, 0),
    "cyan": (40, 220, 230),
    "white": (240, 240, 240),
})

BACKGROUND: tuple[int, int, int] = (20, 22, 30)

SIZES: tuple[str, ...] = ("small", "large")

GRID_SIZE = 3
# Row-major over the 3x3 grid: POSITIONS[row * GRID_SIZE + col].
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

# Side of an object's bounding box, as a fraction of a grid cell (a cell is a third of the
# image side): small objects are a sixth of the image, large ones almost a third.
SIZE_TO_CELL_FRACTION: types.MappingProxyType[str, float] = types.MappingProxyType(
    {"small": 0.5, "large": 0.9})

# Fraction of the free space around an object in its cell that the random offset may use; the
# rest is a margin so that objects in neighbouring cells never touch.
MAX_OFFSET_FRACTION = 0.8

BRIGHTNESS_RANGE: tuple[float, float] = (0.9, 1.1)

# (colour, shape) pairs that never appear in a training scene, to test compositional
# generalisation on validation. Four different colours and four different shapes.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("green", "star"),
    ("blue", "cross"),
    ("yellow", "diamond"),
)

SPLITS: tuple[str, ...] = ("train", "validation")
DEFAULT_NUM_EXAMPLES: types.MappingProxyType[str, int] = types.MappingProxyType(
    {"train": 100_000, "validation": 10_000})

SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class ShapeObject:
  """One object of a scene: its attributes, grid cell and the rendering jitter."""

  shape: str  # One of SHAPES.
  colour: str  # One of COLOURS.
  size: str  # One of SIZES.
  row: int  # Grid row, 0 (top) to GRID_SIZE - 1 (bottom).
  col: int  # Grid column, 0 (left) to GRID_SIZE - 1 (right).
  offset_x: float = 0.0  # Shift of the centre from the cell centre, in cell widths.
  offset_y: float = 0.0  # Shift of the centre from the cell centre, in cell heights.
  brightness: float = 1.0  # Multiplier applied to the colour's RGB value.

  @property
  def position(self) -> str:
    """The name of the grid cell, e.g. "top left"."""
    return POSITIONS[self.row * GRID_SIZE + self.col]


@dataclasses.dataclass(frozen=True)
class Scene:
  """A scene: objects in distinct grid cells, and where it comes from (split, index)."""

  objects: tuple[ShapeObject, ...]
  index: int
  split: str


def split_seed_id(split: str) -> int:
  """The integer that stands for `split` in a scene's seed; raises ValueError if unknown."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; expected one of {SPLITS}.")
  return SPLITS.index(split)


def validate_pairs(pairs: Any) -> tuple[tuple[str, str], ...]:
  """Checks (colour, shape) pairs against the vocabularies and returns them as a tuple."""
  checked = []
  for pair in pairs:
    if len(pair) != 2:
      raise ValueError(f"Held-out entry {pair!r} is not a (colour, shape) pair.")
    colour, shape = pair
    if colour not in COLOURS:
      raise ValueError(f"Unknown colour {colour!r} in held_out; expected one of "
                       f"{tuple(COLOURS)}.")
    if shape not in SHAPES:
      raise ValueError(f"Unknown shape {shape!r} in held_out; expected one of {SHAPES}.")
    checked.append((colour, shape))
  return tuple(checked)


def sample_scene(rng: np.random.Generator, *, index: int, split: str, num_objects: int,
                 pairs: tuple[tuple[str, str], ...]) -> Scene:
  """Draws `num_objects` objects in distinct cells, each (colour, shape) from `pairs`."""
  cells = rng.choice(GRID_SIZE * GRID_SIZE, size=num_objects, replace=False)
  pair_ids = rng.integers(len(pairs), size=num_objects)
  size_ids = rng.integers(len(SIZES), size=num_objects)
  jitter = rng.uniform(-1.0, 1.0, size=(num_objects, 2))
  brightness = rng.uniform(*BRIGHTNESS_RANGE, size=num_objects)
  objects = []
  for i in range(num_objects):
    colour, shape = pairs[pair_ids[i]]
    size = SIZES[size_ids[i]]
    max_offset = MAX_OFFSET_FRACTION * (1.0 - SIZE_TO_CELL_FRACTION[size]) / 2
    row, col = divmod(int(cells[i]), GRID_SIZE)
    objects.append(ShapeObject(
        shape=shape, colour=colour, size=size, row=row, col=col,
        offset_x=float(jitter[i, 0] * max_offset), offset_y=float(jitter[i, 1] * max_offset),
        brightness=float(brightness[i])))
  return Scene(objects=tuple(objects), index=index, split=split)


def shape_variants(scene: Scene, rng: np.random.Generator, pairs: tuple[tuple[str, str], ...],
                   count: int) -> list[Scene]:
  """Up to `count` distinct copies of `scene`, each with one object's shape replaced by another
  allowed shape of its colour.

  Counterfactual siblings: in one batch with the original they are hard negatives that only shape
  tells apart (as NegCLIP's swapped captions, Yuksekgonul et al. 2023). One object, drawn at
  random, takes as many different new shapes as it allows, then the next object, and so on; a
  scene with fewer alternatives than `count` yields fewer variants (none if no object has one).
  """
  variants = []
  for i in rng.permutation(len(scene.objects)):
    obj = scene.objects[i]
    options = [shape for colour, shape in pairs if colour == obj.colour and shape != obj.shape]
    take = min(count - len(variants), len(options))
    for j in rng.choice(len(options), size=take, replace=False):
      new = dataclasses.replace(obj, shape=options[int(j)])
      variants.append(dataclasses.replace(scene, objects=scene.objects[:i] + (new,) + scene.objects[i + 1:]))
    if len(variants) == count:
      break
  return variants


def object_centre(obj: ShapeObject, image_size: int) -> tuple[float, float]:
  """The (x, y) centre of `obj` in pixels of an `image_size` image."""
  cell = image_size / GRID_SIZE
  return (obj.col + 0.5 + obj.offset_x) * cell, (obj.row + 0.5 + obj.offset_y) * cell


def object_rgb(obj: ShapeObject) -> tuple[int, int, int]:
  """The RGB value `obj` is painted with: its colour scaled by its brightness jitter."""
  return tuple(int(min(255, round(c * obj.brightness))) for c in COLOURS[obj.colour])


def _star_points(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
  """A five-pointed star, one point up; the inner radius is wide so small stars stay solid."""
  points = []
  for k in range(10):
    r = radius if k % 2 == 0 else 0.45 * radius
    angle = -math.pi / 2 + k * math.pi / 5
    points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
  return points


def _cross_points(cx: float, cy: float, radius: float) -> list[tuple[float, float]]:
  """A plus sign whose arms are 36% of the object's side thick."""
  a, t = radius, 0.36 * radius
  outline = [(-t, -a), (t, -a), (t, -t), (a, -t), (a, t), (t, t),
             (t, a), (-t, a), (-t, t), (-a, t), (-a, -t), (-t, -t)]
  return [(cx + x, cy + y) for x, y in outline]


def _polygon(shape: str, cx: float, cy: float, radius: float) -> list[tuple[float, float]] | None:
  """The outline of a polygonal shape centred on (cx, cy); None for a circle or a square."""
  if shape == "triangle":
    return [(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)]
  if shape == "diamond":
    return [(cx, cy - radius), (cx + radius, cy), (cx, cy + radius), (cx - radius, cy)]
  if shape == "star":
    return _star_points(cx, cy, radius)
  if shape == "cross":
    return _cross_points(cx, cy, radius)
  if shape in ("circle", "square"):
    return None
  raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def _shape_extent(shape: str) -> tuple[float, float, float, float]:
  """(left, top, right, bottom) of `shape` drawn with radius 1 about the origin (y down)."""
  points = _polygon(shape, 0.0, 0.0, 1.0)
  if points is None:
    return (-1.0, -1.0, 1.0, 1.0)
  xs, ys = [x for x, _ in points], [y for _, y in points]
  return (min(xs), min(ys), max(xs), max(ys))


# Where each shape reaches relative to its centre, in radii: a star's lowest points are 0.81
# radii below its centre and its side points 0.95 radii out; every other shape fills its square.
SHAPE_EXTENTS: types.MappingProxyType[str, tuple[float, float, float, float]] = (
    types.MappingProxyType({shape: _shape_extent(shape) for shape in SHAPES}))


def object_radius(obj: ShapeObject, image_size: float) -> float:
  """Half the side of `obj`'s square, in pixels of an `image_size` image."""
  return SIZE_TO_CELL_FRACTION[obj.size] * image_size / GRID_SIZE / 2


def object_box(obj: ShapeObject, image_size: float = 1.0) -> tuple[float, float, float, float]:
  """The (x1, y1, x2, y2) box of the outline `_draw_object` paints for `obj`, in pixels of an
  `image_size` image (x right, y down); with the default image_size=1, fractions of the side."""
  cx, cy = object_centre(obj, image_size)
  radius = object_radius(obj, image_size)
  left, top, right, bottom = SHAPE_EXTENTS[obj.shape]
  return (cx + left * radius, cy + top * radius, cx + right * radius, cy + bottom * radius)


def _draw_object(draw: ImageDraw.ImageDraw, obj: ShapeObject, canvas_size: int) -> None:
  """Paints `obj` onto a supersampled canvas of side `canvas_size`."""
  cx, cy = object_centre(obj, canvas_size)
  radius = object_radius(obj, canvas_size)
  fill = object_rgb(obj)
  points = _polygon(obj.shape, cx, cy, radius)
  if points is not None:
    draw.polygon(points, fill=fill)
  elif obj.shape == "circle":
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)
  else:  # square
    draw.rectangle((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill)


def render_scene(scene: Scene, image_size: int) -> np.ndarray:
  """Renders `scene` as uint8 [image_size, image_size, 3], anti-aliased by supersampling."""
  canvas_size = image_size * SUPERSAMPLE
  canvas = Image.new("RGB", (canvas_size, canvas_size), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for obj in scene.objects:
    _draw_object(draw, obj, canvas_size)
  # reduce() averages each SUPERSAMPLE x SUPERSAMPLE block: an exact box filter, and fast.
  return np.asarray(canvas.reduce(SUPERSAMPLE))


def check_index(index: SupportsIndex, length: int, what: str) -> int:
  """`index` as an int, raising IndexError naming `what` when it is outside [0, length)."""
  index = operator.index(index)
  if not 0 <= index < length:
    raise IndexError(f"Index {index} is out of range for {what} of {length} examples.")
  return index


@dataclasses.dataclass(frozen=True)
class ShapesWorld:
  """A split of the shapes world as a random-access source: index -> example dict.

  Implements grain's RandomAccessDataSource protocol (`__len__`, `__getitem__`) and pickles,
  so it can feed `grain.MapDataset.source(...)` and grain worker processes directly.
  """

  split: str  # "train" or "validation"; the two never share a random stream.
  seed: int = 0  # World seed; with (split, index) it fixes every scene.
  image_size: int = 64  # Side of the rendered square images, in pixels.
  min_objects: int = 1  # Fewest objects in a scene.
  max_objects: int = 3  # Most objects in a scene (at most GRID_SIZE**2).
  num_examples: int | None = None  # Nominal length; None: 100_000 train, 10_000 validation.
  held_out: tuple[tuple[str, str], ...] = HELD_OUT  # (colour, shape) pairs absent from train.
  # Whether examples also hold a VQA question, a conversation and grounding regions (see
  # `shapes_tasks.scene_annotations`); off, examples cost what they always did.
  annotations: bool = False
  _pairs: tuple[tuple[str, str], ...] = dataclasses.field(
      init=False, repr=False, compare=False)  # (colour, shape) pairs this split samples from.

  def __post_init__(self):
    split_seed_id(self.split)
    held_out = validate_pairs(self.held_out)
    if not 1 <= self.min_objects <= self.max_objects <= GRID_SIZE * GRID_SIZE:
      raise ValueError(f"Need 1 <= min_objects <= max_objects <= {GRID_SIZE ** 2}, got "
                       f"min_objects={self.min_objects}, max_objects={self.max_objects}.")
    if self.image_size < GRID_SIZE * 4:
      raise ValueError(f"image_size={self.image_size} is too small to draw shapes.")
    num_examples = self.num_examples
    if num_examples is None:
      num_examples = DEFAULT_NUM_EXAMPLES[self.split]
    if num_examples < 1:
      raise ValueError(f"num_examples must be positive, got {num_examples}.")
    pairs = tuple((c, s) for c in COLOURS for s in SHAPES)
    if self.split == "train":
      pairs = tuple(p for p in pairs if p not in held_out)
      if not pairs:
        raise ValueError("held_out leaves no (colour, shape) pair for training.")
    # Frozen dataclass: normalised fields are set once, here.
    object.__setattr__(self, "held_out", held_out)
    object.__setattr__(self, "num_examples", num_examples)
    object.__setattr__(self, "_pairs", pairs)

  def __len__(self) -> int:
    return self.num_examples

  def _check_index(self, index: SupportsIndex) -> int:
    return check_index(index, self.num_examples, f"the {self.split!r} shapes world")

  def scene(self, index: SupportsIndex) -> Scene:
    """The scene at `index`, a pure function of (seed, split, index)."""
    index = self._check_index(index)
    rng = np.random.default_rng(
        np.random.SeedSequence([self.seed, split_seed_id(self.split), index]))
    num_objects = int(rng.integers(self.min_objects, self.max_objects + 1))
    return sample_scene(rng, index=index, split=self.split, num_objects=num_objects,
                        pairs=self._pairs)

  def render(self, scene: Scene) -> np.ndarray:
    """Renders `scene` as uint8 [image_size, image_size, 3]."""
    return render_scene(scene, self.image_size)

  def example(self, index: SupportsIndex) -> dict[str, Any]:
    """The example at `index`: image, one caption (template chosen by index), label, index;
    with `annotations`, also question, answers, question_type, conversations and regions."""
    # captions and shapes_tasks build text from this module's vocabularies, so they are imported
    # at call time.
    from vljax.data import captions, shapes_tasks  # pylint: disable=import-outside-toplevel

    scene = self.scene(index)
    example = {
        "image": self.render(scene),
        "caption": captions.caption(scene, variant=scene.index),
        "label": captions.label(scene),
        "index": scene.index,
    }
    if self.annotations:
      example.update(shapes_tasks.scene_annotations(
          scene, seed=self.seed, image_size=self.image_size, held_out=self.held_out))
    return example

  def siblings(self, index: SupportsIndex, count: int) -> list[dict[str, Any]]:
    """`count` shape-changed copies of example `index` (see `shape_variants`), captioned with the
    same template; deterministic in (seed, split, index, count). A scene with too few alternative
    shapes repeats its last variant (or itself), so the count is always `count`."""
    from vljax.data import captions  # pylint: disable=import-outside-toplevel

    if count < 1:
      raise ValueError(f"count must be >= 1, got {count}")
    scene = self.scene(index)
    rng = np.random.default_rng(np.random.SeedSequence(
        [self.seed, split_seed_id(self.split), scene.index, 1]))
    variants = shape_variants(scene, rng, self._pairs, count) or [scene]
    variants += variants[-1:] * (count - len(variants))
    return [{"image": self.render(v), "caption": captions.caption(v, variant=scene.index),
             "label": captions.label(v), "index": scene.index} for v in variants]

  def __getitem__(self, index: SupportsIndex) -> dict[str, Any]:
    return self.example(index)
