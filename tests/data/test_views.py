"""Views: exact tokens and masks on hand-built records, the masks checked by perturbing a loss and
an attention, batch specs, parity with the captioning pipeline, and the errors they raise."""
import json
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.data import captions, pipeline, shapes, tokenizer, views
from vljax.data.batching import stack_examples
from vljax.losses.captioning import captioning_loss, next_token_targets
from vljax.nn.attention import dot_product_attention
from vljax.nn.masks import attention_mask

SIZE = 8  # image side of the hand-built records
L = 64


@pytest.fixture(scope="module")
def tok():
  """A tokenizer that knows the words, digits and punctuation of the records below."""
  extra = ["question: what colour is the circle? answer: red", views.VICUNA_SYSTEM,
           "USER: ASSISTANT: describe the picture. what shape is it? a picture of",
           "(0,1,2,3,4,5,6,7,8,9)", "how many objects are there? yes no"]
  return tokenizer.train_tokenizer(captions.text_corpus() + extra)


@pytest.fixture(scope="module")
def shapes_tok(tmp_path_factory):
  return tokenizer.shapes_tokenizer(cache_dir=str(tmp_path_factory.mktemp("tokenizer_cache")),
                                    added_tokens=tokenizer.VISION_TOKENS)


def _image(seed=0, leading=()):
  return np.random.default_rng(seed).integers(0, 256, (*leading, SIZE, SIZE, 3), dtype=np.uint8)


def _conversation():
  return [{"from": "human", "value": "<image>\nwhat shape is it?"},
          {"from": "gpt", "value": "a red circle."},
          {"from": "human", "value": "what colour is the circle?"},
          {"from": "gpt", "value": "red"}]


# One hand-built record per view: (view name, settings, record).
RECORDS = {
    "caption": ({}, {"image": _image(), "caption": "a large red circle at the top left.",
                     "label": 4}),
    "vqa": ({}, {"image": _image(1), "question": "what colour is the circle?",
                 "answers": ["blue", "red", "red", "blue", "red"], "label": 2}),
    "chat": ({}, {"image": _image(2), "conversations": _conversation()}),
    "interleaved": ({"num_images": 3}, {
        "images": _image(3, (3,)), "prompts": ["a picture of", "a picture of", "a picture of"],
        "answers": ["a red circle.", "a blue star.", "a green cross."]}),
    "video": ({"num_frames": 4}, {"frames": _image(4, (4,)), "caption": "a small blue star."}),
    "grounding": ({}, {"image": _image(5), "index": 7, "regions": [
        {"phrase": "the red circle", "box": (0.25, 0.5, 0.75, 1.0)},
        {"phrase": "the blue star", "box": (0.0, 0.125, 0.5, 0.3)}]}),
}


def _view(name, tok, max_len=L, **settings):
  return views.build_view(name, tok, max_len, image_size=SIZE, **{**RECORDS[name][0], **settings})


def _loss_texts(tok, example):
  """The tokens where mask_loss is 1, decoded, one text per eos."""
  texts, current = [], []
  for token in example["text"][example["mask_loss"] == 1].tolist():
    current.append(token)
    if token == tok.eos_id:
      texts.append(tok.decode([current])[0])
      current = []
  return texts + ([tok.decode([current])[0]] if current else [])


def _padded(ids, fill):
  return np.array(list(ids) + [fill] * (L - len(ids)), np.int32)


def test_caption_tokens_and_masks(tok):
  view, record = _view("caption", tok), RECORDS["caption"][1]
  example = view.map(record)
  ids = [tok.bos_id] + tok.tokenize(record["caption"]) + [tok.eos_id]
  np.testing.assert_array_equal(example["text"], _padded(ids, tok.pad_id))
  np.testing.assert_array_equal(example["mask_ar"], np.ones(L, np.int32))
  np.testing.assert_array_equal(example["mask_loss"], _padded([0] + [1] * (len(ids) - 1), 0))
  assert _loss_texts(tok, example) == [record["caption"]]
  assert example["label"] == 4 and example["label"].dtype == np.int32
  assert view.map({k: v for k, v in record.items() if k != "label"})["label"] == -1
  np.testing.assert_array_equal(example["image"], record["image"])


def test_vqa_tokens_and_masks(tok):
  view, record = _view("vqa", tok), RECORDS["vqa"][1]
  example = view.map(record)
  prefix = [tok.bos_id] + tok.tokenize("question: what colour is the circle? answer:")
  answer = tok.tokenize("red") + [tok.eos_id]  # "red" wins 3 to 2
  np.testing.assert_array_equal(example["text"], _padded(prefix + answer, tok.pad_id))
  np.testing.assert_array_equal(example["mask_ar"], _padded([0] * len(prefix), 1))
  np.testing.assert_array_equal(example["mask_loss"], _padded([0] * len(prefix) + [1] * 2, 0))
  assert _loss_texts(tok, example) == ["red"]
  assert view.references(record) == record["answers"]
  assert views.majority_answer(["no", "yes", "yes", "no"]) == "no"  # ties: the first given
  custom = _view("vqa", tok, template="{question}").map(record)
  question = tok.tokenize("what colour is the circle?")
  assert custom["text"][1:1 + len(question)].tolist() == question
  assert custom["mask_ar"][:2 + len(question)].tolist() == [0] * (1 + len(question)) + [1]


def test_chat_tokens_and_masks_from_llava_json(tok):
  llava_json = r"""[{"id": "000000033471", "image": "coco/train2017/000000033471.jpg",
    "conversations": [
      {"from": "human", "value": "<image>\nwhat shape is it?"},
      {"from": "gpt", "value": "a red circle."},
      {"from": "human", "value": "what colour is the circle?"},
      {"from": "gpt", "value": "red"}]}]"""
  (entry,) = json.loads(llava_json)
  view, image = _view("chat", tok), _image(2)
  example = view.map({"image": image, "conversations": entry["conversations"]})
  image_id = tok.token_id("<image>")
  ids, loss = [tok.bos_id] + tok.tokenize(views.VICUNA_SYSTEM), []
  loss += [0] * len(ids)
  for turn in (tok.tokenize("USER:") + [image_id] + tok.tokenize("what shape is it?") +
               tok.tokenize("ASSISTANT:"), tok.tokenize("a red circle.") + [tok.eos_id],
               tok.tokenize("USER: what colour is the circle? ASSISTANT:"),
               tok.tokenize("red") + [tok.eos_id]):
    loss += [int(turn[-1] == tok.eos_id)] * len(turn)
    ids += turn
  np.testing.assert_array_equal(example["text"], _padded(ids, tok.pad_id))
  np.testing.assert_array_equal(example["mask_ar"], np.ones(L, np.int32))
  np.testing.assert_array_equal(example["mask_loss"], _padded(loss, 0))
  assert _loss_texts(tok, example) == ["a red circle.", "red"]
  assert (example["text"] == image_id).sum() == 1
  assert tok.decode([example["text"]]) == [
      views.VICUNA_SYSTEM + " USER:<image>what shape is it? ASSISTANT: a red circle."]
  # The conversations as JSON text (a WebDataset "json" member) give the same example.
  as_text = view.map({"image": image, "conversations": json.dumps(entry["conversations"])})
  np.testing.assert_array_equal(as_text["text"], example["text"])
  assert view.references({"image": image, "conversations": entry["conversations"]}) == ["red"]


def test_chat_plain_system_and_placeholders(tok):
  record = RECORDS["chat"][1]
  plain = _view("chat", tok, template="plain").map(
      {"image": record["image"], "conversations": record["conversations"][:2]})
  ids = [tok.bos_id, tok.token_id("<image>")] + tok.tokenize("a red circle.") + [tok.eos_id]
  np.testing.assert_array_equal(plain["text"], _padded(ids, tok.pad_id))
  np.testing.assert_array_equal(plain["mask_loss"], _padded([0, 0] + [1] * (len(ids) - 2), 0))
  view = _view("chat", tok)
  with_system = view.map({**record, "system": "describe the picture."})
  assert with_system["text"][1:5].tolist() == tok.tokenize("describe the picture.")
  # No placeholder: the image token goes to the start of the first human turn.
  turns = [{"from": "human", "value": "what shape is it?"}, {"from": "gpt", "value": "a star"}]
  np.testing.assert_array_equal(
      view.map({"image": record["image"], "conversations": turns})["text"],
      view.map({"image": record["image"], "conversations": [
          {**turns[0], "value": "what shape is it? <image>"}, turns[1]]})["text"])
  # Cut before the first reply: an example that would teach nothing is a bad record.
  short = _view("chat", tok, max_len=12).map(record)
  assert "no scored token fits in max_len=12" in short["error"]


def test_interleaved_tokens_masks_and_image_indices(tok):
  view, record = _view("interleaved", tok), RECORDS["interleaved"][1]
  example = view.map(record)
  image_id, end_id = tok.token_id("<image>"), tok.token_id("<|endofchunk|>")
  ids, loss = [tok.bos_id], [0]
  for prompt, answer in zip(record["prompts"], record["answers"]):
    prompt_ids, answer_ids = tok.tokenize(prompt), tok.tokenize(answer) + [end_id]
    ids += [image_id] + prompt_ids + answer_ids
    loss += [0] * (1 + len(prompt_ids)) + [1] * len(answer_ids)
  np.testing.assert_array_equal(example["text"], _padded(ids + [tok.eos_id], tok.pad_id))
  np.testing.assert_array_equal(example["mask_loss"], _padded(loss + [1], 0))
  np.testing.assert_array_equal(example["mask_ar"], np.ones(L, np.int32))
  assert _loss_texts(tok, example) == [
      "".join(a + "<|endofchunk|>" for a in record["answers"])]
  np.testing.assert_array_equal(example["images"], record["images"])
  every = _view("interleaved", tok, loss_on="all").map(record)
  np.testing.assert_array_equal(every["mask_loss"],
                                (every["text"] != tok.pad_id) & (every["text"] != image_id)
                                & (np.arange(L) > 0))


def test_interleaved_image_index_on_hand_built_episodes(tok):
  red, blue = tok.tokenize("red"), tok.tokenize("blue")
  assert len(red) == len(blue) == 1
  bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
  image, end = tok.token_id("<image>"), tok.token_id("<|endofchunk|>")
  view = views.InterleavedView(tok, 10, image_size=SIZE, num_images=3)
  episode = {"images": _image(0, (2,)), "prompts": ["", ""], "answers": ["red", "blue"]}
  example = view.map(episode)
  np.testing.assert_array_equal(
      example["text"], [bos, image, red[0], end, image, blue[0], end, eos, pad, pad])
  np.testing.assert_array_equal(example["image_index"], [-1, 0, 0, 0, 1, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(example["mask_loss"], [0, 0, 1, 1, 0, 1, 1, 1, 0, 0])
  # Two images of a 3-image view: the third is black and no token refers to it.
  np.testing.assert_array_equal(example["images"][:2], episode["images"])
  assert example["images"].shape == (3, SIZE, SIZE, 3) and not example["images"][2].any()
  # The few-shot prompt stops after the query image's prompt (here empty).
  prompt = view.prompt(episode)
  np.testing.assert_array_equal(prompt["text"], [bos, image, red[0], end, image] + [pad] * 5)
  np.testing.assert_array_equal(prompt["image_index"], [-1, 0, 0, 0, 1, 1, 1, 1, 1, 1])
  assert prompt["prompt_len"] == 5 and not prompt["mask_loss"].any()
  assert view.references(episode) == ["blue"]
  assert view.references({**episode, "answer_lists": [["red"], ["blue", "navy"]]}) == [
      "blue", "navy"]
  # A one-image view keeps the first chunk only.
  one = views.InterleavedView(tok, 6, image_size=SIZE, num_images=1).map(episode)
  np.testing.assert_array_equal(one["text"], [bos, image, red[0], end, eos, pad])
  np.testing.assert_array_equal(one["image_index"], [-1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(one["images"], episode["images"][:1])


def test_video_tokens_and_masks(tok):
  view, record = _view("video", tok), RECORDS["video"][1]
  example = view.map(record)
  ids = [tok.bos_id] + tok.tokenize(record["caption"]) + [tok.eos_id]
  np.testing.assert_array_equal(example["text"], _padded(ids, tok.pad_id))
  np.testing.assert_array_equal(example["mask_loss"], _padded([0] + [1] * (len(ids) - 1), 0))
  np.testing.assert_array_equal(example["frames"], record["frames"])
  assert _loss_texts(tok, example) == [record["caption"]]
  with pytest.raises(ValueError, match=r"'frames' as uint8 \[4, H, W, 3\]"):
    view.map({**record, "frames": record["frames"][:3]})


def test_grounding_tokens_masks_and_parse(tok):
  record = RECORDS["grounding"][1]  # index 7 picks regions[1]
  for direction in ("ref2box", "box2ref"):
    view = _view("grounding", tok, direction=direction)
    example = view.map(record)
    phrase = "<ref>the blue star</ref>"
    box = "<box>(0,125),(500,300)</box>"  # round(v * 999): 0.125 -> 125, 0.3 -> 300, 0.5 -> 500
    prompt, answer = (phrase, box) if direction == "ref2box" else (box, phrase)
    prefix = [tok.bos_id] + tok.tokenize(prompt)
    ids = prefix + tok.tokenize(answer) + [tok.eos_id]
    np.testing.assert_array_equal(example["text"], _padded(ids, tok.pad_id))
    np.testing.assert_array_equal(example["mask_ar"], _padded([0] * len(prefix), 1))
    np.testing.assert_array_equal(example["mask_loss"],
                                  _padded([0] * len(prefix) + [1] * (len(ids) - len(prefix)), 0))
    assert _loss_texts(tok, example) == [answer]
    assert view.references(record) == [answer]
  ref2box = _view("grounding", tok)
  parsed = ref2box.parse(box)
  np.testing.assert_allclose(parsed, (0.0, 0.125, 0.5, 0.3), atol=0.5 / 999)
  assert ref2box.parse("( 999 , 0 ), (12,1000)") == (1.0, 0.0, 12 / 999, 1.0)
  assert ref2box.parse("<box>(12,40)</box>") is None and ref2box.parse("a star") is None
  box2ref = _view("grounding", tok, direction="box2ref")
  assert box2ref.parse(" <ref>the blue star</ref>") == "the blue star"
  assert box2ref.parse("the blue star") == "the blue star" and box2ref.parse("<ref></ref>") is None
  first = _view("grounding", tok).map({k: v for k, v in record.items() if k != "index"})
  assert "the red circle" in tok.decode([first["text"]])[0]
  assert views.box_to_text((0.25, 0.5, 0.75, 1.0)) == "(250,500),(749,999)"


@pytest.mark.parametrize("name", list(RECORDS))
def test_loss_mask_by_perturbing_targets(tok, name):
  """Changing a target where mask_loss is 0 leaves the loss as it is; where it is 1, it moves."""
  example = _view(name, tok).map(RECORDS[name][1])
  text_bl, mask_loss_bl = example["text"][None], example["mask_loss"][None]
  logits = jax.random.normal(jax.random.key(0), (1, L - 1, tok.vocab_size))

  def loss(text):
    _, targets, weights = next_token_targets(jnp.asarray(text), jnp.asarray(mask_loss_bl))
    return float(captioning_loss(logits, targets, weights)[0])

  base = loss(text_bl)
  unscored = np.flatnonzero(mask_loss_bl[0] == 0)
  changed = text_bl.copy()
  changed[0, unscored] = (changed[0, unscored] + 1) % tok.vocab_size
  assert loss(changed) == base
  for position in np.flatnonzero(mask_loss_bl[0] == 1):
    changed = text_bl.copy()
    changed[0, position] = (changed[0, position] + 1) % tok.vocab_size
    assert loss(changed) != base, position


def _prefix_length(tok, name):
  """Positions of the bidirectional prefix, from the record's prompt (not from mask_ar)."""
  record = RECORDS[name][1]
  if name == "vqa":
    return 1 + len(tok.tokenize(f"question: {record['question']} answer:"))
  if name == "grounding":
    return 1 + len(tok.tokenize("<ref>the blue star</ref>"))
  return 0


@pytest.mark.parametrize("name", list(RECORDS))
def test_attention_mask_by_perturbing_tokens(tok, name):
  """Output i moves when token j changes iff j <= i, or both lie in the bidirectional prefix."""
  example = _view(name, tok).map(RECORDS[name][1])
  embed_vd = jax.random.normal(jax.random.key(1), (tok.vocab_size, 16))
  mask = attention_mask(jnp.asarray(example["mask_ar"])[None])

  @jax.jit
  def attend(text_bl):
    x_bl1d = embed_vd[text_bl][:, :, None, :]
    return dot_product_attention(x_bl1d, x_bl1d, x_bl1d, mask)[:, :, 0, :]

  # Row 0 is the example; row 1 + j has token j changed.
  texts = np.tile(example["text"], (L + 1, 1))
  texts[1 + np.arange(L), np.arange(L)] = (example["text"] + 1) % tok.vocab_size
  out_bld = np.asarray(attend(jnp.asarray(texts)))
  moved_ji = np.abs(out_bld[1:] - out_bld[:1]).max(-1) > 1e-5
  prefix = _prefix_length(tok, name)
  query, key = np.arange(L)[None, :], np.arange(L)[:, None]
  expected_ji = (key <= query) | ((key < prefix) & (query < prefix))
  np.testing.assert_array_equal(moved_ji, expected_ji)


@pytest.mark.parametrize("name", list(RECORDS))
def test_spec_matches_batched_examples(tok, name):
  view = _view(name, tok)
  examples = [view.map(RECORDS[name][1]) for _ in range(3)]
  batch = stack_examples(examples, keep_strings=False)
  spec = view.spec(3)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (s.shape, s.dtype) for k, s in spec.items()}


@pytest.mark.parametrize("name", list(RECORDS))
def test_prompt_is_the_start_of_the_example_and_continues_to_the_reference(tok, name):
  view, record = _view(name, tok), RECORDS[name][1]
  example, prompt = view.map(record), view.prompt(record)
  assert set(prompt) == set(example) | {"prompt_len"}
  length = int(prompt["prompt_len"])
  assert length >= 1 and prompt["prompt_len"].dtype == np.int32
  np.testing.assert_array_equal(prompt["text"][:length], example["text"][:length])
  assert (prompt["text"][length:] == tok.pad_id).all() and not prompt["mask_loss"].any()
  np.testing.assert_array_equal(prompt["mask_ar"][:length], example["mask_ar"][:length])
  continuation = tok.decode([example["text"][length:]])[0]
  assert view.parse(continuation) in [view.parse(r) for r in view.references(record)]
  assert example["mask_loss"][length:].any()


def _tokenize_caption(tokenizer, max_len, bos, eos, example):
  """The captioning pipeline's transform before views replaced it (TokenizeCaption.map)."""
  captions_ = example["caption"]
  grouped = not isinstance(captions_, str)
  tokens = tokenizer.encode(list(captions_) if grouped else [captions_], max_len, bos=bos, eos=eos)
  return {"image": example["image"], "text": tokens if grouped else tokens[0],
          "label": np.asarray(example.get("label", -1), np.int32)}


@pytest.mark.parametrize("bos", [False, True])
@pytest.mark.parametrize("siblings", [0, 3])
def test_caption_view_reproduces_tokenize_caption(shapes_tok, bos, siblings):
  world = shapes.ShapesWorld("train", seed=3, image_size=16)
  view = views.CaptionView(shapes_tok, 32, bos, True, image_size=16, group_size=1 + siblings)
  records = [world[i] for i in range(6)]
  if siblings:
    records = [pipeline.AddSiblings(world, siblings).map(r) for r in records]
  for record in records:
    expected, got = _tokenize_caption(shapes_tok, 32, bos, True, record), view.map(record)
    for key in ("text", "label", "image"):
      np.testing.assert_array_equal(got[key], expected[key])
      assert got[key].dtype == np.asarray(expected[key]).dtype, key
  batch = stack_examples([view.map(r) for r in records], keep_strings=False)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (s.shape, s.dtype) for k, s in view.spec(len(records)).items()}


def test_views_pickle(tok):
  for name, (settings, record) in RECORDS.items():
    view = _view(name, tok)
    restored = pickle.loads(pickle.dumps(view))
    for key, value in view.map(record).items():
      np.testing.assert_array_equal(restored.map(record)[key], value)


def test_bad_and_unusable_records_become_error_records(tok):
  bad = {"error": "cannot decode image", "key": "000017"}
  for name in RECORDS:
    assert _view(name, tok).map(bad) is bad
    assert _view(name, tok).prompt(bad) is bad
  image = _image()
  unusable = {
      "vqa": {"image": image, "question": "what?", "answers": [], "key": "k1"},
      "chat": {"image": image, "conversations": [{"from": "human", "value": "hi"},
                                                 {"from": "human", "value": "hi"}]},
      "grounding": {"image": image, "regions": [{"phrase": "a star"}]},
      "interleaved": {"images": _image(0, (2,)), "prompts": ["a"], "answers": ["b"]},
  }
  for name, record in unusable.items():
    out = _view(name, tok).map(record)
    assert set(out) == {"error", "key"} and out["error"].startswith(f"{name} view: "), out
  assert _view("vqa", tok).map(unusable["vqa"])["key"] == "k1"
  two_images = {"image": image, "conversations": [
      {"from": "human", "value": "<image> <image> what?"}, {"from": "gpt", "value": "a"}]}
  assert "placeholders" in _view("chat", tok).map(two_images)["error"]
  assert "not valid JSON" in _view("chat", tok).map(
      {"image": image, "conversations": "[{"})["error"]


def test_errors_name_views_settings_and_fields(tok):
  with pytest.raises(ValueError, match="valid views: caption, vqa, chat, interleaved, video, "
                                       "grounding"):
    views.build_view("ocr", tok, L)
  with pytest.raises(ValueError, match=r"temperature for the 'vqa' view; valid settings: "
                                       r"image_size, template"):
    views.build_view("vqa", tok, L, temperature=1.0)
  with pytest.raises(ValueError, match="valid templates: vicuna_v1, plain"):
    views.build_view("chat", tok, L, template="llama_2")
  with pytest.raises(ValueError, match="valid: ref2box, box2ref"):
    views.build_view("grounding", tok, L, direction="box2box")
  with pytest.raises(ValueError, match="valid: answers, all"):
    views.build_view("interleaved", tok, L, loss_on="prompts")
  with pytest.raises(ValueError, match="'chat' view writes the token '<image>'"):
    views.build_view("chat", tokenizer.Tokenizer(tok.model_proto), L)
  with pytest.raises(ValueError, match="'vqa' view needs the record field 'question'"):
    _view("vqa", tok).map({"image": _image(), "caption": "a red circle."})
  with pytest.raises(ValueError, match="'grounding' view needs the record field 'regions'"):
    _view("grounding", tok).prompt({"image": _image()})
  with pytest.raises(ValueError, match=r"'caption' view needs 'image' as uint8 \[H, W, 3\]"):
    _view("caption", tok).map({"image": np.zeros((8, 8, 3), np.float32), "caption": "a"})
  with pytest.raises(ValueError, match=r"'caption' view needs 'image' as uint8 \[2, H, W, 3\]"):
    _view("caption", tok).map({"image": _image(0, (3,)), "caption": ["a", "b"]})
