"""Tests of the shapes world: determinism, splits, held-out pairs, rendering and text captions."""
import pickle
import re

import grain
import numpy as np
import pytest

from vljax.data import shapes, captions

_POSITION_WORDS = "|".join(sorted(shapes.POSITIONS, key=len, reverse=True))
# Two phrasings an object can have in a caption, read back independently of captions.py.
_ATTRIBUTES_FIRST = re.compile(
    rf"\b(small|large) (\w+) (\w+) (?:at the|on the|in the) ({_POSITION_WORDS})\b")
_POSITION_FIRST = re.compile(rf"(?:^|, |and )({_POSITION_WORDS}): a (small|large) (\w+) (\w+)")


def _parse_caption(caption):
  """The (size, colour, shape, position) tuples a caption states, in order of mention."""
  found = [(size, colour, shape, position)
           for size, colour, shape, position in _ATTRIBUTES_FIRST.findall(caption)]
  found += [(size, colour, shape, position)
            for position, size, colour, shape in _POSITION_FIRST.findall(caption)]
  return found


def _describe(obj):
  return (obj.size, obj.colour, obj.shape, obj.position)


def test_same_index_gives_identical_examples_across_instances():
  world_a, world_b = shapes.ShapesWorld("train", seed=3), shapes.ShapesWorld("train", seed=3)
  for index in (0, 1, 17, 99_999):
    example_a, example_b = world_a[index], world_b[index]
    assert example_a["image"].tobytes() == example_b["image"].tobytes()
    assert example_a["caption"] == example_b["caption"]
    assert example_a["label"] == example_b["label"]
    assert world_a.scene(index) == world_b.scene(index)


def test_splits_and_seeds_give_different_scenes():
  train = shapes.ShapesWorld("train")
  validation = shapes.ShapesWorld("validation")
  other_seed = shapes.ShapesWorld("train", seed=1)
  for index in range(20):
    objects = train.scene(index).objects
    assert objects != validation.scene(index).objects
    assert objects != other_seed.scene(index).objects
  assert len(train) == 100_000 and len(validation) == 10_000


def test_held_out_pairs_appear_only_in_validation():
  def pairs(world):
    return {(obj.colour, obj.shape) for index in range(2000)
            for obj in world.scene(index).objects}

  assert not pairs(shapes.ShapesWorld("train")) & set(shapes.HELD_OUT)
  assert set(shapes.HELD_OUT) <= pairs(shapes.ShapesWorld("validation"))
  assert len({c for c, _ in shapes.HELD_OUT}) == len({s for _, s in shapes.HELD_OUT}) == 4


def test_custom_held_out_is_respected():
  world = shapes.ShapesWorld("train", held_out=(("white", "circle"),), num_examples=500)
  seen = {(obj.colour, obj.shape) for index in range(500) for obj in world.scene(index).objects}
  assert ("white", "circle") not in seen
  assert ("red", "triangle") in seen


def test_scenes_have_objects_in_distinct_cells_within_count_bounds():
  world = shapes.ShapesWorld("validation", min_objects=2, max_objects=4)
  counts = set()
  for index in range(300):
    scene = world.scene(index)
    cells = [(obj.row, obj.col) for obj in scene.objects]
    assert len(set(cells)) == len(cells)
    counts.add(len(scene.objects))
  assert counts == {2, 3, 4}


def test_every_caption_states_every_object_exactly():
  """Full captions state every attribute of every object; short ones every colour and shape."""
  world = shapes.ShapesWorld("validation")
  for index in range(60):
    scene = world.scene(index)
    expected = sorted(_describe(obj) for obj in scene.objects)
    all_captions = captions.captions(scene)
    assert len(set(all_captions)) == len(all_captions) >= 5
    full = all_captions[:captions.FULL_CAPTION_TEMPLATES]
    for caption in full:
      assert sorted(_parse_caption(caption)) == expected, caption
    for caption in all_captions:
      assert caption == caption.lower() and caption.endswith(".")
    for caption in all_captions[captions.FULL_CAPTION_TEMPLATES:]:
      named = re.findall(r"a (?:(?:small|large) )?(\w+) (\w+)", caption)
      assert sorted(named) == sorted((o.colour, o.shape) for o in scene.objects), caption
      assert not any(p in caption for p in ("top", "bottom", "left", "right", "center"))
    assert world.example(index)["caption"] in all_captions


def test_rendered_pixels_match_objects_and_background():
  for world in (shapes.ShapesWorld("train"), shapes.ShapesWorld("validation", image_size=48)):
    for index in range(40):
      scene = world.scene(index)
      image = world.render(scene)
      assert image.dtype == np.uint8
      assert image.shape == (world.image_size, world.image_size, 3)
      occupied = set()
      for obj in scene.objects:
        occupied.add((obj.row, obj.col))
        x, y = shapes.object_centre(obj, world.image_size)
        pixel = image[int(y), int(x)].astype(int)
        np.testing.assert_allclose(pixel, shapes.object_rgb(obj), atol=2)
        np.testing.assert_allclose(pixel, shapes.COLOURS[obj.colour], atol=0.1 * 255 + 1)
      cell = world.image_size / shapes.GRID_SIZE
      for row in range(shapes.GRID_SIZE):
        for col in range(shapes.GRID_SIZE):
          if (row, col) not in occupied:
            pixel = image[int((row + 0.5) * cell), int((col + 0.5) * cell)]
            assert tuple(pixel) == shapes.BACKGROUND


def test_shapes_and_sizes_are_distinguishable():
  def mask(shape, size):
    obj = shapes.ShapeObject(shape=shape, colour="white", size=size, row=1, col=1)
    image = shapes.render_scene(shapes.Scene((obj,), index=0, split="train"), 64)
    return np.abs(image.astype(int) - shapes.BACKGROUND).sum(-1) > 3 * 60

  for shape in shapes.SHAPES:
    small, large = mask(shape, "small").sum(), mask(shape, "large").sum()
    assert small >= 20 and large > 2.5 * small, (shape, small, large)
  for size in shapes.SIZES:
    masks = {shape: mask(shape, size) for shape in shapes.SHAPES}
    for i, shape_a in enumerate(shapes.SHAPES):
      for shape_b in shapes.SHAPES[i + 1:]:
        a, b = masks[shape_a], masks[shape_b]
        assert (a & b).sum() / (a | b).sum() < 0.82, (size, shape_a, shape_b)
  colours = np.array(list(shapes.COLOURS.values()) + [shapes.BACKGROUND], dtype=float)
  distances = np.linalg.norm(colours[:, None] - colours[None], axis=-1)
  assert distances[~np.eye(len(colours), dtype=bool)].min() > 100


def test_class_names_ids_and_labels_agree():
  names = captions.class_names()
  assert len(names) == len(set(names)) == len(shapes.COLOURS) * len(shapes.SHAPES)
  for colour in shapes.COLOURS:
    for shape in shapes.SHAPES:
      assert names[captions.class_id(colour, shape)] == f"{colour} {shape}"
  single = shapes.ShapesWorld("validation", max_objects=1)
  for index in range(100):
    example, (obj,) = single[index], single.scene(index).objects
    assert 0 <= example["label"] < len(names)
    assert names[example["label"]] == f"{obj.colour} {obj.shape}"
  several = shapes.ShapesWorld("validation", min_objects=2)
  assert all(several[index]["label"] == -1 for index in range(10))
  for template in captions.ZEROSHOT_TEMPLATES:
    assert template.count("{}") == 1


def test_invalid_indices_and_arguments_raise_clear_errors():
  world = shapes.ShapesWorld("validation", num_examples=10)
  with pytest.raises(IndexError, match="10"):
    world[10]
  with pytest.raises(IndexError):
    world.scene(-1)
  assert world[np.int64(9)]["index"] == 9
  with pytest.raises(ValueError, match="'test'"):
    shapes.ShapesWorld("test")
  with pytest.raises(ValueError, match="'pink'"):
    shapes.ShapesWorld("train", held_out=(("pink", "circle"),))
  with pytest.raises(ValueError, match="'hexagon'"):
    shapes.ShapesWorld("train", held_out=(("red", "hexagon"),))
  with pytest.raises(ValueError, match="min_objects"):
    shapes.ShapesWorld("train", min_objects=0)


def test_world_is_a_picklable_grain_source():
  world = shapes.ShapesWorld("train", image_size=32, num_examples=50)
  restored = pickle.loads(pickle.dumps(world))
  assert restored == world
  assert restored[7]["image"].tobytes() == world[7]["image"].tobytes()
  dataset = grain.MapDataset.source(restored).map(lambda example: example["image"].mean())
  assert len(dataset) == 50
  assert dataset[7] == pytest.approx(world[7]["image"].mean())
  batch = next(iter(grain.MapDataset.source(world).batch(4)))
  assert batch["image"].shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(batch["index"], np.arange(4))


@pytest.mark.parametrize("count", [1, 3, 4])
def test_siblings_differ_from_their_scene_in_exactly_one_shape(count):
  world = shapes.ShapesWorld("train", seed=5)
  allowed = set(world.held_out) ^ {(c, s) for c in shapes.COLOURS for s in shapes.SHAPES}
  for index in range(20):
    scene = world.scene(index)
    group = world.siblings(index, count)
    assert len(group) == count
    captions = [world[index]["caption"]] + [s["caption"] for s in group]
    assert len(set(captions)) == count + 1  # all distinct: no false negatives in a batch
    for sibling in group:
      changed = _parse_caption(sibling["caption"])
      original = [_describe(o) for o in scene.objects]
      if not changed:  # a template without positions: compare the rendered scene instead
        continue
      diffs = [(a, b) for a, b in zip(sorted(original, key=lambda t: t[3]),
                                      sorted(changed, key=lambda t: t[3])) if a != b]
      assert len(diffs) == 1
      (old, new), = diffs
      assert old[:2] == new[:2] and old[3] == new[3] and old[2] != new[2]
      assert (new[1], new[2]) in allowed  # never a held-out (colour, shape) pair
    first = world.siblings(index, count)
    assert [s["image"].tobytes() for s in first] == [s["image"].tobytes() for s in group]


def test_shape_variants_run_out_of_alternatives_gracefully():
  world = shapes.ShapesWorld("train", seed=0, min_objects=1, max_objects=1)
  scene = world.scene(0)
  (obj,) = scene.objects
  pairs = ((obj.colour, obj.shape), (obj.colour, "star" if obj.shape != "star" else "cross"))
  variants = shapes.shape_variants(scene, np.random.default_rng(0), pairs, 3)
  assert len(variants) == 1 and variants[0].objects[0].shape == pairs[1][1]
  assert shapes.shape_variants(scene, np.random.default_rng(0), pairs[:1], 3) == []
  with pytest.raises(ValueError, match="count"):
    world.siblings(0, 0)


def test_object_box_bounds_what_is_painted():
  """object_box follows _draw_object's outlines: a star is narrower and shorter than its square."""
  image_size = 64
  for shape in shapes.SHAPES:
    obj = shapes.ShapeObject(shape=shape, colour="white", size="large", row=1, col=2,
                             offset_x=0.03, offset_y=-0.02)
    image = shapes.render_scene(shapes.Scene((obj,), index=0, split="train"), image_size)
    ys, xs = np.nonzero((image.astype(int) != shapes.BACKGROUND).any(-1))
    painted = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    np.testing.assert_allclose(shapes.object_box(obj, image_size), painted, atol=1.0)
    np.testing.assert_allclose(np.array(shapes.object_box(obj)) * image_size,
                               shapes.object_box(obj, image_size))
  x1, y1, x2, y2 = shapes.SHAPE_EXTENTS["star"]
  assert -1 < x1 < -0.9 and y1 == -1 and 0.9 < x2 < 1 and 0.8 < y2 < 0.82


def test_annotations_flag_is_a_compared_and_pickled_field():
  plain, annotated = shapes.ShapesWorld("train"), shapes.ShapesWorld("train", annotations=True)
  assert plain != annotated and not plain.annotations
  assert pickle.loads(pickle.dumps(annotated)) == annotated
  assert "question" in annotated[0] and "question" not in plain[0]
