"""Evaluators of generative families (types "vqa", "grounding", "perplexity" and "fewshot" of
`config.evals`): prompts from a view, generated text decoded and scored against the record's
answers, or the likelihood a family gives a view's training examples.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any, Sequence

import numpy as np

from vljax.data.shapes_tasks import (EPISODE_TASKS, MAX_VIDEO_OBJECTS, ShapesEpisodes,
                                     ShapesVideos)
from vljax.data.views import build_view, majority_answer, view_settings
from vljax.errors import ConfigError
from vljax.evals.base import Environment, Evaluator, Predict, register
from vljax.evals.caption_metrics import cider_d, tokenize_caption
from vljax.evals.sources import open_source, read_records, source_settings
from vljax.evals.vqa import vqa_scores

Box = Sequence[float]  # (x1, y1, x2, y2), fractions of the image's width and height

# A question any shapes scene answers, asked about images of other evaluators in samples.png.
GENERIC_QUESTION = "how many objects are there?"
IOU_THRESHOLD = 0.5
# The fields of a view's examples that hold one value per text token.
TOKEN_FIELDS = ("text", "mask_ar", "mask_loss", "image_index")
# Views whose records only the shapes world makes (vljax.data.shapes_tasks), not a source.
SHAPES_ONLY_VIEWS = ("interleaved", "video")


def stack_examples(examples: Sequence[dict]) -> dict[str, np.ndarray]:
  """A view's per-record examples -> batched arrays, leaving out the non-numeric fields."""
  batch = {}
  for key, value in examples[0].items():
    value = np.asarray(value)
    if value.dtype.kind in "biuf":
      batch[key] = np.stack([np.asarray(e[key]) for e in examples])
  return batch


def generate(evaluator: Evaluator, predict: Predict, prompts: Sequence[dict],
             max_new_tokens: int) -> list[str]:
  """The texts a family generates after each prompt (a view's `prompt` output), decoded.

  The per-token fields are cut to the longest prompt, and at most as many tokens are generated
  as a training text of the view's length has after it: a decoder sized for the training texts
  (CoCa's) then holds prompt and continuation, and no position goes unseen in training.
  """
  inputs = stack_examples(prompts)
  length, longest = inputs["text"].shape[1], int(np.max(inputs["prompt_len"]))
  inputs = {k: v[:, :longest] if k in TOKEN_FIELDS else v for k, v in inputs.items()}
  tokens = predict("generate", inputs, max_new_tokens=max(1, min(max_new_tokens,
                                                                 length - longest)))
  return evaluator.env.tokenizer.decode(tokens)


def make_view(env: Environment, name: str, **overrides):
  """View `name` as training builds it: the training text length and image size, the training
  captions' BOS / EOS where the view takes them, config.data.view_settings when it is the
  training view; then `overrides`."""
  data, accepted = env.data, view_settings(name)
  settings: dict[str, Any] = {"image_size": data.image_size}
  if "bos" in accepted:
    settings.update(bos=data.text_bos, eos=data.text_eos)
  if data.get("view") == name:
    settings.update(dict(data.get("view_settings") or {}))
  settings.update(overrides)
  return build_view(name, env.tokenizer, data.max_text_len, **settings)


def make_prompts(evaluator: Evaluator, view, records: Sequence[dict]) -> list[dict]:
  """The view's prompts of `records`; raises when one is unusable or fills the whole text (it
  may be cut short, and leaves no room to generate)."""
  prompts = [view.prompt(r) for r in records]
  for prompt in prompts:
    if "error" in prompt:
      raise ValueError(f"{evaluator.where}: the {view.name!r} view cannot prompt with a record: "
                       f"{prompt['error']}")
  full = sum(int(p["prompt_len"]) >= view.max_len for p in prompts)
  if full:
    raise ConfigError(f"{evaluator.where}: {full} of {len(prompts)} {view.name!r} prompts fill "
                      f"all config.data.max_text_len={view.max_len} tokens; raise it (or shorten "
                      "the prompts)")
  return prompts


def _check_positive(evaluator: Evaluator, *keys: str) -> None:
  for key in keys:
    if evaluator.settings[key] < 1:
      raise ConfigError(f"{evaluator.where}.{key}={evaluator.settings[key]!r} must be >= 1")


def _shapes_spec(evaluator: Evaluator, what: str):
  """The evaluator's source settings, which must name the shapes world."""
  spec = source_settings(evaluator.settings.source, evaluator.where)
  if spec.kind != "shapes":
    raise ConfigError(f"{evaluator.where}.source: {what} come from the shapes world only, not a "
                      f"{spec.kind!r} source; remove the source or set it to 'shapes'")
  return spec


def _image_key(image: np.ndarray) -> bytes:
  return hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).digest()


@register("vqa")
class VQA(Evaluator):
  """VQAv2 accuracy (official normalisation, 10-annotator soft score) of generated answers,
  overall and per question type ("NAME/accuracy", "NAME/accuracy/<type>")."""

  NEEDS = ("generate",)
  VIEW = "vqa"
  SETTINGS = dict(questions=500, max_new_tokens=8)

  def __init__(self, name, settings, env):
    super().__init__(name, settings, env)
    _check_positive(self, "questions", "max_new_tokens")
    source = open_source(settings.source, self.where, env.data, settings.questions)
    self.records = read_records(source, settings.questions, self.where,
                                needs=("image", "question", "answers"))
    self.images = np.stack([r["image"] for r in self.records])
    self.view = make_view(env, "vqa")
    self.answers = [self.view.references(r) for r in self.records]
    # Per-type accuracies when the source names question types (the shapes world and VQAv2 do).
    typed = any("question_type" in r for r in self.records)
    self.question_types = ([r.get("question_type") or "other" for r in self.records]
                           if typed else None)
    self.prompts = make_prompts(self, self.view, self.records)
    self.by_image = {_image_key(image): i for i, image in enumerate(self.images)}
    self.last_answers: list[str] = []
    self._shown = None  # the images `sample` returned, which `annotate` leaves alone

  def describe(self) -> str:
    return f"{self.name}: VQA accuracy on {self.settings.questions} questions"

  def answer(self, predict: Predict, prompts: list[dict]) -> list[str]:
    texts = generate(self, predict, prompts, self.settings.max_new_tokens)
    return [self.view.parse(text) for text in texts]

  def run(self, predict: Predict) -> dict[str, float]:
    self.last_answers = self.answer(predict, self.prompts)
    scores = vqa_scores(self.last_answers, self.answers, self.question_types)
    return {f"{self.name}/{key}": float(value) for key, value in scores.items() if key != "count"}

  def _lines(self, predict: Predict, questions: list[str], prompts: list[dict],
             answers: list[list[str] | None]) -> list[list[str]]:
    lines = []
    for question, generated, references in zip(questions, self.answer(predict, prompts), answers):
      if references:
        generated = f"{generated} ({majority_answer(references)})"
      lines.append([f"Q: {question}", f"A: {generated}"])
    return lines

  def sample(self, predict: Predict, count: int):
    self._shown = self.images[:count]
    return self._shown, self._lines(predict, [r["question"] for r in self.records[:count]],
                                    self.prompts[:count], self.answers[:count])

  def annotate(self, predict: Predict, images: np.ndarray) -> list[list[str]] | None:
    """Its own question and answer for images it also evaluates (the shapes evaluators share
    the validation scenes), GENERIC_QUESTION about others; nothing for its own samples."""
    if images is self._shown:
      return None
    found = [self.by_image.get(_image_key(image)) for image in images]
    questions = [GENERIC_QUESTION if i is None else self.records[i]["question"] for i in found]
    prompts = [self.view.prompt({"image": image, "question": question, "answers": []})
               for image, question in zip(images, questions)]
    return self._lines(predict, questions, prompts,
                       [None if i is None else self.answers[i] for i in found])


def iou(box_a: Box, box_b: Box) -> float:
  """Intersection over union of two (x1, y1, x2, y2) boxes; a box with x2 < x1 or y2 < y1 is
  empty, and two empty boxes have IoU 0."""
  ax1, ay1, ax2, ay2 = (float(v) for v in box_a)
  bx1, by1, bx2, by2 = (float(v) for v in box_b)
  intersection = (max(0.0, min(ax2, bx2) - max(ax1, bx1)) *
                  max(0.0, min(ay2, by2) - max(ay1, by1)))
  union = (max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) +
           max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - intersection)
  return intersection / union if union > 0 else 0.0


def draw_box(image: np.ndarray, box: Box, colour: tuple[int, int, int]) -> np.ndarray:
  """A copy of uint8 `image` [H, W, 3] with the outline of `box` (fractions) drawn on it."""
  image = np.array(image)
  height, width = image.shape[:2]
  x1, x2 = sorted(int(np.clip(round(v * width), 0, width - 1)) for v in (box[0], box[2]))
  y1, y2 = sorted(int(np.clip(round(v * height), 0, height - 1)) for v in (box[1], box[3]))
  image[y1:y2 + 1, [x1, x2]] = colour
  image[[y1, y2], x1:x2 + 1] = colour
  return image


@register("grounding")
class Grounding(Evaluator):
  """Referring expression -> box: "NAME/acc@0.5" (IoU >= 0.5 with the reference box; a box the
  view cannot parse is a miss), "NAME/miou" (unparsed boxes count 0) and "NAME/unparsed"."""

  NEEDS = ("generate",)
  VIEW = "grounding"
  # A box is "<box>(x1,y1),(x2,y2)</box>": up to 21 tokens when digits are single tokens.
  SETTINGS = dict(regions=200, max_new_tokens=24, direction="ref2box")
  DIRECTIONS = ("ref2box",)

  def __init__(self, name, settings, env):
    super().__init__(name, settings, env)
    _check_positive(self, "regions", "max_new_tokens")
    if settings.direction not in self.DIRECTIONS:
      raise ConfigError(f"{self.where}.direction={settings.direction!r}; this evaluator scores "
                        f"boxes, so choose one of {self.DIRECTIONS}")
    source = open_source(settings.source, self.where, env.data, settings.regions)
    # One query per region, in reading order: a record holding the image and that region alone.
    self.queries: list[dict] = []
    for record in read_records(source, min(settings.regions, len(source)), self.where,
                               needs=("image", "regions")):
      self.queries += [{"image": record["image"], "regions": [region]}
                       for region in record["regions"]]
    if len(self.queries) < settings.regions:
      raise ValueError(f"{self.where}: wanted {settings.regions} regions, found "
                       f"{len(self.queries)} in {source!r}")
    self.queries = self.queries[:settings.regions]
    self.boxes = [tuple(float(v) for v in q["regions"][0]["box"]) for q in self.queries]
    self.view = make_view(env, "grounding", direction=settings.direction)
    self.prompts = make_prompts(self, self.view, self.queries)

  def describe(self) -> str:
    return (f"{self.name}: grounding accuracy (IoU >= {IOU_THRESHOLD}) on "
            f"{self.settings.regions} regions")

  def predict_boxes(self, predict: Predict, prompts: list[dict]) -> list[Box | None]:
    texts = generate(self, predict, prompts, self.settings.max_new_tokens)
    return [self.view.parse(text) for text in texts]

  def run(self, predict: Predict) -> dict[str, float]:
    predicted = self.predict_boxes(predict, self.prompts)
    ious = np.array([0.0 if box is None else iou(box, reference)
                     for box, reference in zip(predicted, self.boxes)])
    parsed = np.array([box is not None for box in predicted])
    return {f"{self.name}/acc@{IOU_THRESHOLD}": float(np.mean(parsed & (ious >= IOU_THRESHOLD))),
            f"{self.name}/miou": float(np.mean(ious)),
            f"{self.name}/unparsed": float(np.mean(~parsed))}

  def sample(self, predict: Predict, count: int):
    """Images with the reference box in white and the predicted one in green."""
    predicted = self.predict_boxes(predict, self.prompts[:count])
    images, lines = [], []
    for query, box, reference in zip(self.queries, predicted, self.boxes):
      image = draw_box(query["image"], reference, (255, 255, 255))
      found = "unparsed"
      if box is not None:
        image = draw_box(image, box, (0, 255, 0))
        found = f"IoU {iou(box, reference):.2f}"
      images.append(image)
      lines.append([f"find: {query['regions'][0]['phrase']}", f"box: {found}"])
    return np.stack(images), lines


@register("perplexity")
class Perplexity(Evaluator):
  """Perplexity of a view's training examples on validation records: exp(summed token NLL /
  scored tokens), over the tokens the view's loss mask scores ("NAME/perplexity",
  "NAME/nll_per_token", and "NAME/token_accuracy" when the family counts argmax hits).
  Interleaved episodes are captions, with as many shots as the view has images after the
  first; videos have the view's frame count. For samples.png, a family that generates shows
  its greedy completions of the prompts of a view without images (the text view's first
  words of a caption), as text-only rows."""

  NEEDS = ("token_nll",)
  SETTINGS = dict(examples=500, view="caption")

  def __init__(self, name, settings, env):
    super().__init__(name, settings, env)
    _check_positive(self, "examples")
    if settings.view not in env.family_views:
      raise ConfigError(f"{self.where}.view={settings.view!r} is not a view family "
                        f"{env.family_name!r} trains on (its views: "
                        f"{', '.join(env.family_views) or 'none'})")
    self.view = make_view(env, settings.view)
    records = read_records(self._source(), settings.examples, self.where,
                           needs=self.view.fields)
    self.records = records
    examples = [self.view.map(r) for r in records]
    bad = [e["error"] for e in examples if "error" in e]
    if bad:
      raise ValueError(f"{self.where}: the {settings.view!r} view cannot use {len(bad)} of "
                       f"{len(examples)} records (first: {bad[0]})")
    self.inputs = stack_examples(examples)

  def _source(self):
    count, data, view = self.settings.examples, self.env.data, self.settings.view
    if view not in SHAPES_ONLY_VIEWS:
      return open_source(self.settings.source, self.where, data, count)
    spec = _shapes_spec(self, f"records of the {view!r} view")
    kw = dict(split="validation", seed=data.shapes.world_seed, image_size=data.image_size,
              num_examples=count, min_objects=spec.min_objects or data.shapes.min_objects,
              max_objects=spec.max_objects or data.shapes.max_objects)
    if view == "interleaved":
      return ShapesEpisodes(shots=self.view.num_images - 1, task="caption", **kw)
    kw["max_objects"] = min(kw["max_objects"], MAX_VIDEO_OBJECTS)
    kw["min_objects"] = min(kw["min_objects"], kw["max_objects"])
    return ShapesVideos(frames=self.view.num_frames, **kw)

  def describe(self) -> str:
    return (f"{self.name}: perplexity on {self.settings.examples} {self.settings.view!r} "
            "examples")

  def run(self, predict: Predict) -> dict[str, float]:
    out = predict("token_nll", self.inputs)
    nll = float(np.sum(np.asarray(out["nll"], np.float64)))
    tokens = float(np.sum(np.asarray(out["tokens"], np.float64)))
    if tokens <= 0:
      raise ValueError(f"{self.where}: the {self.settings.view!r} view's examples score no "
                       "tokens (their mask_loss is all 0)")
    nll_per_token = nll / tokens
    metrics = {f"{self.name}/perplexity": math.exp(nll_per_token),
               f"{self.name}/nll_per_token": nll_per_token}
    if "correct" in out:
      correct = float(np.sum(np.asarray(out["correct"], np.float64)))
      metrics[f"{self.name}/token_accuracy"] = correct / tokens
    return metrics

  def sample(self, predict: Predict, count: int):
    """Text-only rows (empty images) of prompts and greedy completions, for a view without
    images and a family that generates; None otherwise."""
    if "generate" not in self.env.family_predict or any(
        k in self.view.spec(1) for k in ("image", "images", "frames")):
      return None
    records = self.records[:count]
    prompts = make_prompts(self, self.view, records)
    completions = generate(self, predict, prompts, self.view.max_len)
    prompt_texts = self.env.tokenizer.decode(np.stack([p["text"] for p in prompts]))
    lines = [[f"prompt: {p}", f"greedy: {p} {c}".rstrip(), f"reference: {r['caption']}"]
             for p, c, r in zip(prompt_texts, completions, records)]
    return np.zeros((len(records), 0, 0, 3), np.uint8), lines


@register("fewshot")
class FewShot(Evaluator):
  """In-context few-shot on interleaved shapes episodes (`shots` solved examples, then a query,
  from the validation split): VQA accuracy of the query's answer against its 10 answers
  ("NAME/accuracy", task "vqa") or CIDEr-D of its caption against every caption of the scene
  ("NAME/cider", task "caption")."""

  NEEDS = ("generate",)
  VIEW = "interleaved"
  # max_new_tokens 0: 8 for VQA answers, the training text length for captions.
  SETTINGS = dict(episodes=200, shots=2, task="vqa", max_new_tokens=0)

  def __init__(self, name, settings, env):
    super().__init__(name, settings, env)
    _check_positive(self, "episodes")
    if settings.task not in EPISODE_TASKS:
      raise ConfigError(f"{self.where}.task={settings.task!r}; choose one of {EPISODE_TASKS}")
    if settings.shots < 0 or settings.max_new_tokens < 0:
      raise ConfigError(f"{self.where}: shots and max_new_tokens must be >= 0")
    spec = _shapes_spec(self, "few-shot episodes")
    self.view = make_view(env, "interleaved")
    if settings.shots + 1 > self.view.num_images:
      raise ConfigError(f"{self.where}.shots={settings.shots}: an episode of {settings.shots} "
                        f"shots and a query needs {settings.shots + 1} images, more than the "
                        f"interleaved view's num_images={self.view.num_images} "
                        "(config.data.view_settings)")
    data = env.data
    episodes = ShapesEpisodes(
        split="validation", seed=data.shapes.world_seed, shots=settings.shots, task=settings.task,
        image_size=data.image_size, num_examples=settings.episodes,
        min_objects=spec.min_objects or data.shapes.min_objects,
        max_objects=spec.max_objects or data.shapes.max_objects)
    self.records = [episodes[i] for i in range(settings.episodes)]
    # The query's 10 answers; for captions, every caption of the scene once (they are cycled).
    self.references = [self.view.references(r) for r in self.records]
    if settings.task == "caption":
      self.references = [list(dict.fromkeys(refs)) for refs in self.references]
    self.prompts = make_prompts(self, self.view, self.records)
    self.max_new_tokens = settings.max_new_tokens or (
        VQA.SETTINGS["max_new_tokens"] if settings.task == "vqa" else data.max_text_len - 1)
    self.last_texts: list[str] = []

  def describe(self) -> str:
    return (f"{self.name}: {self.settings.shots}-shot {self.settings.task} on "
            f"{self.settings.episodes} episodes")

  def complete(self, predict: Predict, prompts: list[dict]) -> list[str]:
    texts = generate(self, predict, prompts, self.max_new_tokens)
    return [self.view.parse(text) for text in texts]

  def score(self, texts: list[str]) -> dict[str, float]:
    if self.settings.task == "vqa":
      return {f"{self.name}/accuracy": vqa_scores(texts, self.references)["accuracy"]}
    candidates = {i: tokenize_caption(text) for i, text in enumerate(texts)}
    references = {i: [tokenize_caption(c) for c in refs] for i, refs in enumerate(self.references)}
    return {f"{self.name}/cider": cider_d(candidates, references)}

  def run(self, predict: Predict) -> dict[str, float]:
    self.last_texts = self.complete(predict, self.prompts)
    return self.score(self.last_texts)

  def sample(self, predict: Predict, count: int):
    """The query images, with the query and the generated (reference) answer."""
    texts = self.complete(predict, self.prompts[:count])
    lines = []
    for record, text, references in zip(self.records, texts, self.references):
      query = record["prompts"][-1]
      head = [f"{self.settings.shots}-shot Q: {query}"] if query else []
      lines.append(head + [f"A: {text} ({references[0]})"])
    return np.stack([r["images"][-1] for r in self.records[:count]]), lines
