"""The generative evaluators end to end, with fake predict functions whose answers are known:
VQA accuracy, grounding accuracy / IoU, perplexity and few-shot scores, and start-up errors."""
import math

import numpy as np
import pytest

from vljax.data import captions, shapes_tasks
from vljax.data.pipeline import data_config
from vljax.data.shapes import ShapesWorld
from vljax.data.tokenizer import train_tokenizer
from vljax.data.views import box_to_text, build_view
from vljax.errors import ConfigError
from vljax.evals import generative
from vljax.evals.base import EVALUATORS, Environment, build_evaluators, evaluator_settings
from vljax.evals.caption_metrics import cider_d, tokenize_caption
from vljax.evals.generative import iou

GENERATIVE = {"generate", "token_nll", "embed_images", "embed_texts"}
COCA_VIEWS = ("caption", "vqa", "grounding")


@pytest.fixture(scope="module")
def tok():
  # The shapes tokenizer's corpus (captions) lacks digits and brackets: VQA count answers and
  # grounding boxes need them, so these tests train one on every text the shapes tasks write.
  corpus = captions.text_corpus() + shapes_tasks.text_corpus(num_scenes=50)
  return train_tokenizer(corpus + ["question: answer: (0,1,2,3,4,5,6,7,8,9)"])


def _data(**kw):
  return data_config({"image_size": 32, "max_text_len": 32, **kw})


def _world(count):
  return ShapesWorld(split="validation", seed=0, image_size=32, num_examples=count,
                     annotations=True)


def _build(name, entry, env):
  return build_evaluators({name: entry}, env, GENERATIVE)[0]


def _tokens(tok, texts, length):
  """Generated token rows for `texts`: their tokens, eos, then padding."""
  rows = np.full((len(texts), length), tok.pad_id, np.int32)
  for row, text in zip(rows, texts):
    ids = (tok.tokenize(text) + [tok.eos_id])[:length]
    row[:len(ids)] = ids
  return rows


def _fake_generate(tok, answer_for_row, calls=None):
  """predict("generate", ...) answering row i of each call with answer_for_row(i, inputs)."""
  def predict(name, inputs, **options):
    assert name == "generate" and {"text", "prompt_len"} <= set(inputs)
    if calls is not None:
      calls.append((inputs, options))
    rows = len(inputs["text"])
    return _tokens(tok, [answer_for_row(i, inputs) for i in range(rows)],
                   options["max_new_tokens"])
  return predict


def test_registered_types():
  assert {"vqa", "grounding", "perplexity", "fewshot"} <= set(EVALUATORS)
  settings = evaluator_settings("fs", {"type": "fewshot"})
  assert (settings.episodes, settings.shots, settings.task) == (200, 2, "vqa")
  assert evaluator_settings("g", {"type": "grounding"}).direction == "ref2box"


# ------------------------------------------------------------------------------------------------
# VQA


def test_vqa_accuracy_every_other_answer_right(tok):
  env = Environment(_data(), tok, "coca", COCA_VIEWS)
  count = 12
  records = [_world(count)[i] for i in range(count)]
  calls = []
  # Right (in another surface form the normalisation undoes) on even rows, wrong on odd ones.
  predict = _fake_generate(
      tok, lambda i, _: f"the {records[i]['answers'][0]}." if i % 2 == 0 else "", calls)
  evaluator = _build("vqa", {"type": "vqa", "questions": count}, env)
  assert evaluator.describe() == "vqa: VQA accuracy on 12 questions"
  metrics = evaluator.run(predict)
  assert metrics["vqa/accuracy"] == 0.5
  by_type = {}
  for i, record in enumerate(records):
    by_type.setdefault(record["question_type"], []).append(float(i % 2 == 0))
  assert {k: v for k, v in metrics.items() if k != "vqa/accuracy"} == {
      f"vqa/accuracy/{t}": pytest.approx(np.mean(s)) for t, s in by_type.items()}
  # The prompts are the vqa view's, for the records' images, cut to the longest, asking for 8
  # new tokens.
  inputs, options = calls[0]
  assert options == {"max_new_tokens": 8}
  assert inputs["text"].shape == inputs["mask_ar"].shape == (count, inputs["prompt_len"].max())
  np.testing.assert_array_equal(inputs["image"], np.stack([r["image"] for r in records]))
  for i in (0, count - 1):
    prompt = tok.decode([inputs["text"][i][:inputs["prompt_len"][i]]])[0]
    assert records[i]["question"] in prompt


def test_vqa_samples_and_annotations(tok):
  env = Environment(_data(), tok, "coca", COCA_VIEWS)
  evaluator = _build("val_vqa", {"type": "vqa", "questions": 6}, env)
  records = [_world(6)[i] for i in range(6)]
  predict = _fake_generate(tok, lambda i, _: "yes")
  images, lines = evaluator.sample(predict, 3)
  assert images.shape == (3, 32, 32, 3)
  assert lines[1] == [f"Q: {records[1]['question']}", f"A: yes ({records[1]['answers'][0]})"]
  assert evaluator.annotate(predict, images) is None  # its own samples are described already
  foreign = np.zeros((1, 32, 32, 3), np.uint8)
  annotated = evaluator.annotate(predict, np.concatenate([images[2:3].copy(), foreign]))
  assert annotated == [lines[2], [f"Q: {generative.GENERIC_QUESTION}", "A: yes"]]


# ------------------------------------------------------------------------------------------------
# Grounding


@pytest.mark.parametrize("box_a, box_b, expected", [
    ((0.1, 0.2, 0.5, 0.6), (0.1, 0.2, 0.5, 0.6), 1.0),
    ((0, 0, 2, 1), (1, 0, 3, 1), 1 / 3),  # overlap 1, union 3
    ((0, 0, 1, 1), (0, 0, 2, 2), 1 / 4),  # contained
    ((0, 0, 1, 1), (0.5, 0.5, 1.5, 1.5), 0.25 / 1.75),
    ((0, 0, 1, 1), (2, 2, 3, 3), 0.0),  # disjoint
    ((0, 0, 1, 1), (1, 0, 2, 1), 0.0),  # touching edges
    ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),  # empty boxes
    ((1, 1, 0, 0), (0, 0, 1, 1), 0.0),  # an inverted box is empty
])
def test_iou_hand_cases(box_a, box_b, expected):
  assert iou(box_a, box_b) == pytest.approx(expected, abs=1e-12)
  assert iou(box_b, box_a) == pytest.approx(expected, abs=1e-12)


def test_grounding_accuracy_miou_and_unparsed(tok):
  env = Environment(_data(), tok, "coca", COCA_VIEWS)
  count = 12
  world = _world(count)
  regions = [(world[i]["image"], r) for i in range(count) for r in world[i]["regions"]][:count]
  texts, ious = [], []
  for i, (_, region) in enumerate(regions):
    x1, y1, x2, y2 = box = region["box"]
    guess = {0: box,  # right
             1: (x1, y1, (x1 + x2) / 2, y2),  # half of it: IoU about 1/2
             2: (1 - x2, 1 - y2, 1 - x1, 1 - y1),  # mirrored
             3: None}[i % 4]  # no box at all
    texts.append("the red circle" if guess is None else f"<box>{box_to_text(guess)}</box>")
    # What the model's box reads back as: coordinates are integers over 999.
    ious.append(0.0 if guess is None else
                iou([round(v * 999) / 999 for v in guess], box))

  def answer(i, inputs):
    image, region = regions[i]
    np.testing.assert_array_equal(inputs["image"][i], image)
    assert region["phrase"] in tok.decode([inputs["text"][i][:inputs["prompt_len"][i]]])[0]
    return texts[i]

  evaluator = _build("ground", {"type": "grounding", "regions": count}, env)
  assert evaluator.describe() == "ground: grounding accuracy (IoU >= 0.5) on 12 regions"
  metrics = evaluator.run(_fake_generate(tok, answer))
  assert all(ious[i] > 0.95 for i in range(0, count, 4))
  assert set(metrics) == {"ground/acc@0.5", "ground/miou", "ground/unparsed"}
  assert metrics["ground/acc@0.5"] == pytest.approx(np.mean([v >= 0.5 for v in ious]))
  assert 0.25 <= metrics["ground/acc@0.5"] < 0.75
  assert metrics["ground/miou"] == pytest.approx(np.mean(ious), abs=1e-12)
  assert metrics["ground/unparsed"] == 0.25
  images, lines = evaluator.sample(_fake_generate(tok, answer), 4)
  assert images.shape == (4, 32, 32, 3) and lines[3][1] == "box: unparsed"
  assert lines[0] == [f"find: {regions[0][1]['phrase']}", f"box: IoU {ious[0]:.2f}"]
  # The reference box in white, the predicted one in green (over it, when they coincide).
  assert (images[2] == 255).all(axis=-1).any() and (images[0] == (0, 255, 0)).all(axis=-1).any()


def test_generation_stops_at_the_training_text_length(tok):
  env = Environment(_data(max_text_len=16), tok, "coca", COCA_VIEWS)
  calls = []
  evaluator = _build("ground", {"type": "grounding", "regions": 3}, env)
  evaluator.run(_fake_generate(tok, lambda i, _: "", calls))
  inputs, options = calls[0]
  longest = int(inputs["prompt_len"].max())
  assert inputs["text"].shape == (3, longest)
  assert options == {"max_new_tokens": 16 - longest}  # not the 24 asked for


def test_grounding_rejects_box2ref(tok):
  env = Environment(_data(), tok, "coca", COCA_VIEWS)
  with pytest.raises(ConfigError, match="direction='box2ref'"):
    _build("ground", {"type": "grounding", "regions": 2, "direction": "box2ref"}, env)


# ------------------------------------------------------------------------------------------------
# Perplexity


@pytest.mark.parametrize("view", ["caption", "vqa"])
def test_perplexity_matches_float64_numpy(tok, view):
  env = Environment(_data(), tok, "coca", COCA_VIEWS)
  count = 10
  nll = np.random.default_rng(0).uniform(1.0, 30.0, count).astype(np.float32)

  def predict(name, inputs, **options):
    assert name == "token_nll" and not options
    assert {"image", "text", "mask_loss"} <= set(inputs)
    return {"nll": nll, "tokens": inputs["mask_loss"].sum(axis=1).astype(np.float32)}

  evaluator = _build("ppl", {"type": "perplexity", "examples": count, "view": view}, env)
  assert evaluator.describe() == f"ppl: perplexity on 10 {view!r} examples"
  metrics = evaluator.run(predict)
  reference_view = build_view(view, tok, 32, image_size=32,
                              **({"bos": False, "eos": True} if view == "caption" else {}))
  tokens = sum(int(reference_view.map(_world(count)[i])["mask_loss"].sum())
               for i in range(count))
  nll_per_token = np.sum(nll.astype(np.float64)) / tokens
  assert metrics == {"ppl/perplexity": pytest.approx(math.exp(nll_per_token), rel=1e-12),
                     "ppl/nll_per_token": pytest.approx(nll_per_token, rel=1e-12)}


@pytest.mark.parametrize("view, pixels", [("interleaved", "images"), ("video", "frames")])
def test_perplexity_of_shapes_only_views(tok, view, pixels):
  env = Environment(_data(max_text_len=64), tok, "flamingo", (view,))
  seen = {}

  def predict(name, inputs, **options):
    seen.update(inputs)
    return {"nll": inputs["mask_loss"].sum(axis=1) * 2.0, "tokens": inputs["mask_loss"].sum(1)}

  evaluator = _build("ppl", {"type": "perplexity", "examples": 3, "view": view}, env)
  assert evaluator.run(predict) == {"ppl/perplexity": pytest.approx(math.exp(2.0)),
                                    "ppl/nll_per_token": pytest.approx(2.0)}
  assert seen[pixels].shape[:2] == (3, 4 if view == "interleaved" else 8)
  assert seen["mask_loss"].sum(axis=1).min() > 0
  with pytest.raises(ConfigError, match="shapes world only"):
    _build("ppl", {"type": "perplexity", "examples": 3, "view": view,
                   "source": {"kind": "webdataset", "shards": "x.tar"}}, env)


def test_perplexity_view_must_be_one_the_family_trains_on(tok):
  env = Environment(_data(), tok, "coca", COCA_VIEWS)
  with pytest.raises(ConfigError, match="view='chat'.*coca"):
    _build("ppl", {"type": "perplexity", "examples": 2, "view": "chat"}, env)


# ------------------------------------------------------------------------------------------------
# Few-shot


def _episodes(count, task, shots=2):
  episodes = shapes_tasks.ShapesEpisodes(split="validation", seed=0, shots=shots, task=task,
                                         image_size=32, num_examples=count)
  return [episodes[i] for i in range(count)]


def test_fewshot_vqa_accuracy(tok):
  env = Environment(_data(max_text_len=64), tok, "flamingo", ("interleaved",))
  count = 8
  episodes = _episodes(count, "vqa")

  def answer(i, inputs):
    np.testing.assert_array_equal(inputs["images"][i][:3], episodes[i]["images"])
    prompt = tok.decode([inputs["text"][i][:inputs["prompt_len"][i]]])[0]
    assert prompt.endswith(episodes[i]["prompts"][-1])  # the query's question, unanswered
    # A model goes on after its answer; the view's parse keeps what precedes <|endofchunk|>.
    return (episodes[i]["answers"][-1] if i % 2 == 0 else "") + "<|endofchunk|><image>"

  evaluator = _build("fs", {"type": "fewshot", "episodes": count}, env)
  assert evaluator.describe() == "fs: 2-shot vqa on 8 episodes"
  assert evaluator.run(_fake_generate(tok, answer)) == {"fs/accuracy": 0.5}
  images, lines = evaluator.sample(_fake_generate(tok, answer), 2)
  assert images.shape == (2, 32, 32, 3) and lines[1][-1] == f"A:  ({episodes[1]['answers'][-1]})"


def test_fewshot_caption_cider(tok):
  env = Environment(_data(max_text_len=64), tok, "flamingo", ("interleaved",))
  count = 6
  episodes = _episodes(count, "caption", shots=1)
  references = {i: [tokenize_caption(c) for c in dict.fromkeys(e["answer_lists"][-1])]
                for i, e in enumerate(episodes)}
  evaluator = _build("fs_cap", {"type": "fewshot", "episodes": count, "shots": 1,
                                "task": "caption"}, env)
  right = evaluator.run(_fake_generate(tok, lambda i, _: episodes[i]["answers"][-1]))
  expected = cider_d({i: tokenize_caption(e["answers"][-1]) for i, e in enumerate(episodes)},
                     references)
  assert right == {"fs_cap/cider": pytest.approx(expected, rel=1e-12)}
  wrong = evaluator.run(_fake_generate(tok, lambda i, _: episodes[0]["answers"][-1]))
  assert wrong["fs_cap/cider"] < right["fs_cap/cider"]


def test_fewshot_errors(tok):
  env = Environment(_data(max_text_len=64), tok, "flamingo", ("interleaved",))
  with pytest.raises(ConfigError, match="shapes world only.*'tfds'"):
    _build("fs", {"type": "fewshot", "episodes": 2, "source": {"kind": "tfds", "name": "x"}},
           env)
  with pytest.raises(ConfigError, match="shots=4.*num_images=4"):
    _build("fs", {"type": "fewshot", "episodes": 2, "shots": 4}, env)
  with pytest.raises(ConfigError, match="task='count'"):
    _build("fs", {"type": "fewshot", "episodes": 2, "task": "count"}, env)
  short = Environment(_data(max_text_len=12), tok, "flamingo", ("interleaved",))
  with pytest.raises(ConfigError, match="max_text_len=12"):
    _build("fs", {"type": "fewshot", "episodes": 2}, short)


# ------------------------------------------------------------------------------------------------
# Start-up checks


@pytest.mark.parametrize("entry", [{"type": "vqa"}, {"type": "grounding"}, {"type": "fewshot"}])
def test_missing_generate_fails_at_start_up_naming_it(tok, entry):
  env = Environment(_data(), tok, "clip", ("caption", "vqa", "grounding", "interleaved"))
  with pytest.raises(ConfigError, match="needs predict function.*generate.*'clip'"):
    build_evaluators({"gen": entry}, env, {"embed_images", "embed_texts"})


def test_missing_token_nll_fails_at_start_up_naming_it(tok):
  env = Environment(_data(), tok, "clip", ("caption",))
  with pytest.raises(ConfigError, match="token_nll"):
    build_evaluators({"ppl": {"type": "perplexity"}}, env, {"generate"})


@pytest.mark.parametrize("entry, view", [({"type": "vqa"}, "vqa"),
                                         ({"type": "grounding"}, "grounding"),
                                         ({"type": "fewshot"}, "interleaved")])
def test_missing_view_fails_at_start_up_naming_it(tok, entry, view):
  env = Environment(_data(), tok, "coca", ("caption",))
  with pytest.raises(ConfigError, match=f"'{view}' view, which family 'coca' does not train on"):
    build_evaluators({"gen": entry}, env, GENERATIVE)
