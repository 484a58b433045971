"""Shapes-world task records: regions vs pixels, correct conversations, episodes, videos whose
captions match the motion on screen, determinism, and held-out pairs only in validation."""
import dataclasses
import functools
import hashlib
import pickle
import re

import numpy as np
import pytest

from vljax.data import captions, shapes, shapes_qa, shapes_tasks

_POSITIONS = "|".join(sorted(captions.POSITION_PHRASES, key=len, reverse=True))
_COLOURS = "|".join(shapes.COLOURS)
_SHAPES = "|".join(shapes.SHAPES)
# "the red circle", "the large red circle at the top left", "the object on the left", ...
_REFERENCE = re.compile(
    rf"the (?:(small|large) )?(?:({_COLOURS}) )?(?:({_SHAPES})|object)(?: ({_POSITIONS}))?")


def _resolve(scene, reference):
  """The objects of `scene` a reference fits, read independently of shapes_tasks, and the
  attributes it names."""
  match = _REFERENCE.fullmatch(reference)
  assert match, reference
  size, colour, shape, position = match.groups()
  named = {"size": size, "colour": colour, "shape": shape}
  named = {k: v for k, v in named.items() if v is not None}
  fits = [o for o in scene.objects if all(getattr(o, k) == v for k, v in named.items())]
  if position is not None:
    named["position"] = position
    cell = captions.POSITION_PHRASES.index(position)
    fits = [o for o in fits if o.row * shapes.GRID_SIZE + o.col == cell]
  return fits, set(named)


def _the_one(scene, reference):
  fits, named = _resolve(scene, reference)
  assert len(fits) == 1, f"{reference!r} fits {fits}"
  return fits[0], named


def _same(a, b):
  """Whether two records are equal, arrays included."""
  if isinstance(a, np.ndarray):
    return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
  if isinstance(a, dict):
    return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
  if isinstance(a, (list, tuple)):
    return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
  return a == b


def _sources(split="train", **kwargs):
  return {
      "scenes": shapes.ShapesWorld(split, seed=3, annotations=True, num_examples=400, **kwargs),
      "episodes/caption": shapes_tasks.ShapesEpisodes(split, seed=3, task="caption",
                                                      num_examples=400, **kwargs),
      "episodes/vqa": shapes_tasks.ShapesEpisodes(split, seed=3, task="vqa", shots=3,
                                                  num_examples=400, **kwargs),
      "videos": shapes_tasks.ShapesVideos(split, seed=3, max_objects=3, num_examples=400,
                                          **kwargs),
  }


@pytest.mark.parametrize("name", ["scenes", "episodes/caption", "episodes/vqa", "videos"])
def test_records_are_deterministic_random_access_and_picklable(name):
  source = _sources()[name]
  fresh = _sources()[name]
  restored = pickle.loads(pickle.dumps(source))
  assert restored == source and len(source) == 400
  indices = [0, 7, 399, 7, 123]
  forward = [source[i] for i in indices]
  backward = [fresh[i] for i in reversed(indices)][::-1]
  for i, a, b in zip(indices, forward, backward):
    assert _same(a, b) and _same(a, restored[np.int64(i)]), (name, i)
    assert a["index"] == i
  assert not _same(forward[0], forward[1])
  assert not _same(dataclasses.replace(source, seed=4)[0], forward[0])
  with pytest.raises(IndexError):
    source[400]


# Whether a text says that an object is a held-out pair: "red triangle", "small red triangle",
# "the red object is a triangle", "what shape is the red object? triangle".
def _held_out_mentions(text):
  return [(c, s) for c, s in shapes.HELD_OUT
          if re.search(rf"\b{c}(?: object\b[^,.]*?(?:is a|\?))? {s}\b", text)]


def _texts(name, record):
  """Every text of a record, a question followed by its answer."""
  if name == "scenes":
    conversation = [turn["value"] for turn in record["conversations"]]
    return ([record["caption"], f"{record['question']} {record['answers'][0]}"]
            + [f"{q} {a}" for q, a in zip(conversation[::2], conversation[1::2])]
            + [region["phrase"] for region in record["regions"]])
  if name.startswith("episodes"):
    return ([f"{p} {a}" for p, a in zip(record["prompts"], record["answers"])]
            + [a for answers in record["answer_lists"] for a in answers])
  return [record["caption"]]


@functools.lru_cache
def _world(split, seed):
  return shapes.ShapesWorld(split, seed=seed)


def _scenes_of(name, source, index):
  """The objects a record shows, from the source's own account (scenes, video motions)."""
  if name == "scenes":
    return list(source.scene(index).objects)
  if name.startswith("episodes"):
    world = _world(source.split, source.seed)
    return [o for i in source.scene_indices(index) for o in world.scene(i).objects]
  return [motion.obj for motion in source.motions(index)]


@pytest.mark.parametrize("name", ["scenes", "episodes/caption", "episodes/vqa", "videos"])
def test_held_out_pairs_only_in_validation(name):
  assert _held_out_mentions("the red object at the top is a triangle.")  # the check can fail
  assert not _held_out_mentions("is the red circle bigger than the blue triangle?")
  train = _sources("train")[name]
  for index in range(300):
    record = train[index]
    for text in _texts(name, record):
      assert not _held_out_mentions(text), (index, text)
    assert not {(o.colour, o.shape) for o in _scenes_of(name, train, index)} & set(shapes.HELD_OUT)
  validation = _sources("validation")[name]
  mentioned = {pair for index in range(300) for text in _texts(name, validation[index])
               for pair in _held_out_mentions(text)}
  assert mentioned == set(shapes.HELD_OUT), mentioned


@pytest.mark.parametrize("image_size", [32, 48, 64])
def test_region_boxes_are_tight_about_the_rendered_pixels(image_size):
  world = shapes.ShapesWorld("validation", seed=1, image_size=image_size, max_objects=5)
  def mask_of(scene):
    return (world.render(scene).astype(int) != shapes.BACKGROUND).any(-1)

  for index in range(40):
    scene = world.scene(index)
    regions = shapes_tasks.regions(scene, image_size)
    ordered = sorted(scene.objects, key=lambda o: (o.row, o.col))
    assert len(regions) == len(ordered)
    union = np.zeros((image_size, image_size), bool)
    for region, obj in zip(regions, ordered):
      assert _the_one(scene, region["phrase"])[0] == obj
      x1, y1, x2, y2 = region["box"]
      assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
      # The object alone, as the renderer paints it: its pixels span the box to within a pixel.
      ys, xs = np.nonzero(mask_of(shapes.Scene((obj,), index=index, split=scene.split)))
      pixel_box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
      np.testing.assert_allclose(np.array(region["box"]) * image_size, pixel_box, atol=1.0)
      left, top = int(np.floor(x1 * image_size)) - 1, int(np.floor(y1 * image_size)) - 1
      right, bottom = int(np.ceil(x2 * image_size)) + 1, int(np.ceil(y2 * image_size)) + 1
      union[max(top, 0):bottom, max(left, 0):right] = True
    # In the full scene, every painted pixel is in a box (give or take a pixel).
    assert not (mask_of(scene) & ~union).any()
  region = shapes_tasks.regions(world.scene(0), image_size)[0]
  assert region["phrase"].startswith("the ") and isinstance(region["box"][0], float)


def test_phrases_add_size_then_position_when_needed():
  def obj(size, row, col, colour="red"):
    return shapes.ShapeObject(shape="circle", colour=colour, size=size, row=row, col=col)

  scene = shapes.Scene((obj("large", 1, 0), obj("small", 0, 1), obj("small", 2, 2),
                        obj("small", 0, 0, colour="blue")), index=0, split="validation")
  assert [r["phrase"] for r in shapes_tasks.regions(scene, 64)] == [
      "the blue circle", "the red circle at the top", "the large red circle",
      "the red circle at the bottom right"]


def _check_turn(scene, question, answer):
  """Answers one conversation round independently of shapes_tasks; returns its kind."""
  if question in shapes_tasks.DESCRIBE_PROMPTS:
    assert answer in captions.captions(scene)
    return "describe"
  if match := re.fullmatch(r"what (colour|shape) is (.+)\?", question):
    asked, reference = match.groups()
  elif match := re.fullmatch(r"is (.+) small or large\?", question):
    asked, reference = "size", match.group(1)
  elif match := re.fullmatch(r"where is (.+)\?", question):
    asked, reference = "position", match.group(1)
  elif match := re.fullmatch(r"is (.+) (bigger|smaller) than (.+)\?", question):
    (a, _), relation, (b, _) = (_the_one(scene, match.group(1)), match.group(2),
                                _the_one(scene, match.group(3)))
    assert a != b
    scale = {"small": 0, "large": 1}
    difference = scale[a.size] - scale[b.size]
    if difference == 0:
      assert answer == "no, they are the same size.", (question, answer)
    else:
      truth = (difference > 0) == (relation == "bigger")
      actual = relation if truth else {"bigger": "smaller", "smaller": "bigger"}[relation]
      assert answer == (f"{'yes' if truth else 'no'}, {match.group(1)} is {actual} than "
                        f"{match.group(3)}."), (question, answer)
    return "compare"
  elif match := re.fullmatch(
      r"which is (further left|further right|higher up|lower down), (.+) or (.+)\?", question):
    relation, name_a, name_b = match.groups()
    (a, _), (b, _) = _the_one(scene, name_a), _the_one(scene, name_b)
    (ax, ay), (bx, by) = shapes.object_centre(a, 1), shapes.object_centre(b, 1)
    a_wins = {"further left": ax < bx, "further right": ax > bx, "higher up": ay < by,
              "lower down": ay > by}[relation]
    assert answer == f"{name_a if a_wins else name_b} is {relation}.", (question, answer)
    return "compare"
  else:
    raise AssertionError(f"Unexpected question {question!r}")
  obj, named = _the_one(scene, reference)
  assert asked not in named, question
  value = {"colour": obj.colour, "shape": f"a {obj.shape}", "size": obj.size,
           "position": captions.POSITION_PHRASES[obj.row * shapes.GRID_SIZE + obj.col]}[asked]
  assert answer == f"{reference} is {value}.", (question, answer)
  return "object"


def test_conversations_are_well_formed_and_correct():
  kinds_seen, rounds_seen = set(), set()
  for split in shapes.SPLITS:
    world = shapes.ShapesWorld(split, seed=2, max_objects=4)
    for index in range(120):
      scene = world.scene(index)
      for number in range(3):
        turns = shapes_tasks.conversation(scene, number, seed=5)
        assert turns == shapes_tasks.conversation(scene, number, seed=5)
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        rounds_seen.add(len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in turns[1:])
        pairs = [(q["value"].removeprefix("<image>\n"), a["value"])
                 for q, a in zip(turns[::2], turns[1::2])]
        assert len({q for q, _ in pairs}) == len(pairs)  # no question twice
        kinds = [_check_turn(scene, q, a) for q, a in pairs]
        if len(scene.objects) == 1:
          assert "compare" not in kinds
        kinds_seen.update(kinds)
  assert kinds_seen == {"describe", "object", "compare"} and rounds_seen == {2, 3}
  scene = shapes.ShapesWorld("train").scene(0)
  assert len({str(shapes_tasks.conversation(scene, i)) for i in range(10)}) > 5
  with pytest.raises(ValueError):
    shapes_tasks.conversation(scene, -1)


def test_scene_annotations_agree_with_qa_conversations_and_regions():
  world = shapes.ShapesWorld("validation", seed=4, image_size=48, annotations=True)
  for index in range(30):
    example, scene = world[index], world.scene(index)
    qa = shapes_qa.sample_question(scene, 0, 4)
    assert (example["question"], example["question_type"]) == (qa.question, qa.question_type)
    assert example["answers"] == [qa.answer] * 10
    assert example["conversations"] == shapes_tasks.conversation(scene, 0, seed=4)
    assert example["regions"] == shapes_tasks.regions(scene, 48)


# sha256 over image bytes, caption, label and index of examples 0, 1, 2, 17, 123 and 9999, from
# the code before annotations existed: training runs must keep seeing the same data.
_GOLDEN = {
    "train": ({"split": "train", "seed": 0},
              "61859335e9f5abc18b326f4b275181ee870d82ffdd03b2e8d5c74f1e0347d787"),
    "validation": ({"split": "validation", "seed": 3, "image_size": 48, "max_objects": 5},
                   "c47deee5a55a4a73ed8f7ca81bdcaf71a4e5815c9a12741d086d37846580d061"),
}


@pytest.mark.parametrize("which", list(_GOLDEN))
@pytest.mark.parametrize("annotations", [False, True])
def test_scene_examples_are_unchanged(which, annotations):
  kwargs, expected = _GOLDEN[which]
  world = shapes.ShapesWorld(**kwargs, annotations=annotations)
  digest = hashlib.sha256()
  for index in (0, 1, 2, 17, 123, 9999):
    example = world[index]
    extra = ({"question", "answers", "question_type", "conversations", "regions"}
             if annotations else set())
    assert set(example) == {"image", "caption", "label", "index"} | extra
    for value in (example["image"].tobytes(), example["caption"], example["label"],
                  example["index"]):
      digest.update(value if isinstance(value, bytes) else str(value).encode())
  assert digest.hexdigest() == expected


@pytest.mark.parametrize("task", shapes_tasks.EPISODE_TASKS)
def test_episodes_are_solved_scenes_of_the_split(task):
  shots = 3
  episodes = shapes_tasks.ShapesEpisodes("validation", seed=6, shots=shots, task=task,
                                         image_size=32, num_examples=50, max_objects=2)
  world = shapes.ShapesWorld("validation", seed=6, image_size=32, max_objects=2,
                             annotations=True)
  for index in range(20):
    record = episodes[index]
    assert record["images"].shape == (shots + 1, 32, 32, 3)
    assert record["images"].dtype == np.uint8 and record["index"] == index
    assert len(record["prompts"]) == len(record["answers"]) == len(record["answer_lists"])
    scene_indices = episodes.scene_indices(index)
    assert len(set(scene_indices)) == shots + 1 and scene_indices[-1] == index
    for image, prompt, answer, answers, scene_index in zip(
        record["images"], record["prompts"], record["answers"], record["answer_lists"],
        scene_indices):
      scene_record = world[scene_index]
      np.testing.assert_array_equal(image, scene_record["image"])
      assert len(answers) == 10 and answers[0] == answer
      if task == "vqa":
        assert (prompt, answers) == (scene_record["question"], scene_record["answers"])
      else:
        assert prompt == "" and answer == scene_record["caption"]
        assert set(answers) == set(captions.captions(world.scene(scene_index)))
  assert len({tuple(episodes.scene_indices(i)[:-1]) for i in range(50)}) == 50
  with pytest.raises(ValueError, match="task"):
    shapes_tasks.ShapesEpisodes(task="chat")


_MOTION = re.compile(rf"the ({_COLOURS}) ({_SHAPES}) (moves to the right|moves to the left|"
                     r"moves up|moves down|stays still)")


def _centroid(frame, colour):
  """The centre of the pixels painted close to `colour` (brightness jitter is at most 10%)."""
  close = np.abs(frame.astype(int) - shapes.COLOURS[colour]).max(-1) < 30
  ys, xs = np.nonzero(close)
  assert len(xs) >= 4, colour
  return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("frames", [2, 4, 6])
def test_video_captions_match_the_motion_on_screen(frames):
  videos = shapes_tasks.ShapesVideos("validation", seed=1, frames=frames, max_objects=3)
  cell = videos.image_size / shapes.GRID_SIZE
  checked = 0
  directions = set()
  for index in range(60):
    record = videos[index]
    assert record["frames"].shape == (frames, 64, 64, 3) and record["frames"].dtype == np.uint8
    caption = record["caption"]
    motions = _MOTION.findall(caption)
    phrases = [f"the {c} {s} {m}" for c, s, m in motions]
    assert caption == (phrases[0] if len(phrases) == 1  # "a.", "a and b.", "a, b and c."
                       else ", ".join(phrases[:-1]) + " and " + phrases[-1]) + "."
    assert 1 <= len(motions) <= 3 and sum(m == "stays still" for *_, m in motions) <= 1
    colours = [c for c, _, _ in motions]
    for colour, _, motion in motions:
      directions.add(motion)
      if colours.count(colour) > 1:
        continue  # two objects of one colour: pixels cannot tell them apart
      checked += 1
      path = np.stack([_centroid(frame, colour) for frame in record["frames"]])
      dx, dy = path[-1] - path[0]
      expected = {"moves to the right": (1, 0), "moves to the left": (-1, 0),
                  "moves up": (0, -1), "moves down": (0, 1), "stays still": (0, 0)}[motion]
      for delta, sign in ((dx, expected[0]), (dy, expected[1])):
        if sign:
          assert delta * sign > cell / 2, (index, caption, path)
        else:
          assert abs(delta) < 1.5, (index, caption, path)
      # A straight line at constant speed.
      line = path[0] + np.outer(np.linspace(0, 1, frames), path[-1] - path[0])
      np.testing.assert_allclose(path, line, atol=1.5)
  assert checked > 90 and len(directions) == 5


def test_video_objects_never_touch_and_stay_inside():
  videos = shapes_tasks.ShapesVideos("train", seed=0, frames=5, max_objects=3, min_objects=3)
  for index in range(200):
    motions = videos.motions(index)
    assert len({(m.obj.colour, m.obj.shape) for m in motions}) == 3
    for t in np.linspace(0, 1, 9):
      boxes = [shapes.object_box(m.at(t)) for m in motions]
      for i, (x1, y1, x2, y2) in enumerate(boxes):
        assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1
        for u1, v1, u2, v2 in boxes[i + 1:]:
          assert x2 < u1 or u2 < x1 or y2 < v1 or v2 < y1, (index, t)


def test_text_corpus_covers_every_task_vocabulary():
  corpus = shapes_tasks.text_corpus(num_scenes=60)
  assert corpus == shapes_tasks.text_corpus(num_scenes=60)
  assert len(corpus) == len(set(corpus))
  vocabulary = {word for text in corpus for word in re.findall(r"[a-z]+", text)}
  for text in corpus:
    assert "<image>" not in text and text == text.lower()
    assert not re.search(r"\d", text) or text.isdigit(), text  # digits: VQA counts only
    assert re.fullmatch(r"[a-z0-9 ,.:?]+", text), text
  # Records of another seed use no word the corpus lacks.
  sources = _sources("validation")
  for index in range(40):
    for name, source in sources.items():
      for text in _texts(name, source[index]):
        assert set(re.findall(r"[a-z]+", text)) <= vocabulary, text
