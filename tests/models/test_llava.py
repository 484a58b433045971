"""LLaVA (`vljax.models.llava`, family "llava"): image tokens land exactly at the placeholders
(several images per row, ragged rows with missing images, checked against a NumPy
construction); placeholder and image counts must agree (an error, eager and under jit); a view's
texts expand to P image tokens per image as a Python construction says; the family's loss is
the NLL of the assistant tokens alone (perturbing the logits anywhere else leaves it bitwise
unchanged) and token_nll adds up to it; its KV-cached generation equals greedy recomputation
with the full forward; the LLaVA-1.5 presets have the released models' parameter counts."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vljax.data.pipeline import data_config
from vljax.data.tokenizer import VISION_TOKENS, shapes_tokenizer
from vljax.data.views import ChatView, VqaView
from vljax.families import bind, get_family
from vljax.models import llava
from vljax.train.config import base_config

IMAGE_ID = 60
SIDE = 12  # 3 x 3 patches of 4 px: P = 9 (the CLS dropped)


def _tiny(**changes):
  fields = dict(vision=dict(width=24, depth=3, mlp_dim=40, num_heads=2, patch_size=4,
                            class_token=True, pre_norm=True, patch_bias=False),
                lm=dict(recipe="llama", vocab_size=61, width=32, depth=2, num_heads=4,
                        num_kv_heads=2, mlp_dim=48, max_len=128),
                projector="mlp2x_gelu", image_token_id=IMAGE_ID)
  return llava.Llava(**{**fields, **changes})


def _random_params(model, *inputs, seed=0):
  """Parameters of `model` drawn at unit-variance scale (logits spread over several units)."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *inputs)["params"])
  rng = np.random.default_rng(seed)

  def draw(path, x):
    normal = rng.standard_normal(x.shape).astype(np.float32)
    name = path[-1].key
    if name == "scale":
      return 1.0 + 0.1 * normal
    if name == "bias":
      return 0.1 * normal
    if name in ("embedding", "pos_embedding", "cls"):
      return 0.5 * normal
    fan_in = int(np.prod(x.shape[:-1])) if name == "kernel" and len(x.shape) == 2 else x.shape[0]
    return 1.5 * normal / np.sqrt(fan_in)

  return jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract))


def test_image_tokens_land_exactly_at_the_placeholders():
  model = _tiny()
  per_image = model.num_image_tokens(SIDE)
  assert per_image == 9
  # Row 0: three images around text; row 1: its middle image missing (two images); row 2: none.
  mask = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 0]], bool)
  rng = np.random.default_rng(0)
  length = 40
  tokens = rng.integers(2, IMAGE_ID, size=(3, length)).astype(np.int32)
  starts = {0: [1, 12, 30], 1: [3, 20], 2: []}
  for row, places in starts.items():
    for start in places:
      tokens[row, start:start + per_image] = IMAGE_ID
  images = rng.standard_normal((3, 3, SIDE, SIDE, 3)).astype(np.float32)
  params = _random_params(model, images, tokens, mask)
  embeds, aux = jax.jit(lambda p, i, t, m: model.apply({"params": p}, i, t, m,
                                                       method=llava.Llava.embed_inputs))(
                                                           params, images, tokens, mask)
  embeds, image_embeds = np.asarray(embeds), np.asarray(aux["img/embeds"])
  assert image_embeds.shape == (3, 3, per_image, 32) and not np.asarray(aux["img/mismatch"]).any()
  # NumPy: the text rows of the embedding table, then the k-th valid image's tokens at its run.
  want = np.asarray(params["language_model"]["token_embedding"]["embedding"])[tokens]
  for row, places in starts.items():
    for start, image in zip(places, np.flatnonzero(mask[row])):
      want[row, start:start + per_image] = image_embeds[row, image]
  np.testing.assert_array_equal(embeds, want)
  # The projected tokens are the projector of the tower's patches (the CLS dropped).
  features = np.asarray(aux["img/features"])
  assert features.shape == (3, 3, per_image, 24)
  tower = jax.jit(lambda p, x: model.vision_module().apply({"params": p}, x)[1]["tokens"])(
      params["img"], images.reshape(9, SIDE, SIDE, 3))
  np.testing.assert_allclose(features.reshape(9, per_image, 24), np.asarray(tower)[:, 1:],
                             atol=1e-6)


def test_placeholder_and_image_counts_must_agree():
  model = _tiny()
  tokens = np.full((2, 20), 5, np.int32)
  tokens[0, 1:10] = IMAGE_ID  # one image's 9 tokens
  tokens[1, 1:8] = IMAGE_ID  # 7: a cut image
  images = np.zeros((2, 1, SIDE, SIDE, 3), np.float32)
  params = _random_params(model, images, tokens)
  # Eager (concrete counts): a ValueError at once.
  with pytest.raises(ValueError, match=r"row 1: 7 placeholders, 1 images x 9 = 9 image tokens"):
    llava.splice_image_tokens(np.zeros((2, 20, 4), np.float32), tokens == IMAGE_ID,
                              np.zeros((2, 1, 9, 4), np.float32), np.ones((2, 1), bool))
  # Under jit: the error comes from the device through a host callback.
  forward = jax.jit(lambda p, t: model.apply({"params": p}, images, t)["logits"])
  with pytest.raises(Exception, match=r"row 1: 7 placeholders"):
    jax.block_until_ready(forward(params, tokens))
  tokens[1, 1:10] = IMAGE_ID
  assert np.isfinite(np.asarray(forward(params, tokens))).all()


def _python_expand(text, mask_ar, mask_loss, image_id, per_image, pad_id, out_len):
  """The expansion written as list operations, one row at a time."""
  if image_id in text:
    pieces = [([image_id] * per_image, [a] * per_image, [0] * per_image) if t == image_id
              else ([t], [a], [m]) for t, a, m in zip(text, mask_ar, mask_loss)]
  else:
    pieces = [([text[0]], [mask_ar[0]], [mask_loss[0]]),
              ([image_id] * per_image, [mask_ar[0]] * per_image, [0] * per_image)]
    pieces += [([t], [a], [m]) for t, a, m in zip(text[1:], mask_ar[1:], mask_loss[1:])]
  out = [sum((list(p[k]) for p in pieces), []) for k in range(3)]
  pad = out_len - len(out[0])
  return (out[0] + [pad_id] * pad, out[1] + [1] * pad, out[2] + [0] * pad)


def test_view_texts_expand_to_p_tokens_per_image_at_the_placeholder_or_after_the_bos():
  rng = np.random.default_rng(1)
  length, per_image, image_id, pad_id = 12, 5, 9, 0
  text = rng.integers(1, 9, size=(6, length)).astype(np.int32)
  text[0, 3] = image_id  # a placeholder inside the text
  text[1, 1] = image_id  # right after the bos
  text[2, length - 1] = image_id  # the last token
  text[4, 8:] = pad_id  # rows 3-5: none (an image goes after the bos), one of them padded
  mask_ar = rng.integers(0, 2, size=(6, length)).astype(np.int32)
  mask_loss = rng.integers(0, 2, size=(6, length)).astype(np.int32)
  prompt_len = np.array([4, 2, 12, 1, 8, 5], np.int32)
  out = jax.jit(lambda *a: llava.expand_image_tokens(
      *a[:3], image_token_id=image_id, tokens_per_image=per_image, prompt_len_b=a[3],
      pad_id=pad_id))(text, mask_ar, mask_loss, prompt_len)
  out_len = length + per_image
  for row in range(6):
    want = _python_expand(list(text[row]), list(mask_ar[row]), list(mask_loss[row]), image_id,
                          per_image, pad_id, out_len)
    for key, values in zip(("text", "mask_ar", "mask_loss"), want):
      np.testing.assert_array_equal(out[key][row], values, err_msg=f"{key} of row {row}")
    np.testing.assert_array_equal(out["image"][row], np.array(want[0]) == image_id)
  # A prompt ends where its last token's expansion does.
  np.testing.assert_array_equal(out["prompt_len"], [3 + 5, 1 + 5, 11 + 5, 1 + 5, 8 + 5, 5 + 5])
  # A tokenizer without a placeholder token (image_token_id < 0): images after the bos, pad ids.
  none = llava.expand_image_tokens(text[3:], mask_ar[3:], mask_loss[3:], image_token_id=-1,
                                   tokens_per_image=per_image, pad_id=pad_id)
  np.testing.assert_array_equal(none["text"][:, 1:1 + per_image], pad_id)
  assert np.asarray(none["image"])[:, 1:1 + per_image].all()
  assert np.asarray(none["image"]).sum() == 3 * per_image


# ---------------------------------------------------------------------------------------------
# The family.


@pytest.fixture(scope="module")
def chat():
  """A bound "llava" family on the chat view (no system prompt, so texts stay short), random
  params and a batch of three conversations of one and two rounds."""
  tokenizer = shapes_tokenizer(added_tokens=VISION_TOKENS, corpus="all")
  config = base_config()
  config.family = "llava"
  config.model = dict(variant="mu")
  config.data = dict(view="chat", max_text_len=40, image_size=16, text_bos=True)
  bound = bind(get_family("llava"), config, tokenizer, data_config(config.data))
  assert bound.model.image_token_id == tokenizer.token_id("<image>")
  assert bound.model.lm_fields()["max_len"] == 40 + 4
  view = ChatView(tokenizer, 40, image_size=16)
  rng = np.random.default_rng(0)
  turns = [[("human", "<image>what colour is the circle?"), ("gpt", "the circle is red.")],
           [("human", "how many objects are there?<image>"), ("gpt", "two."),
            ("human", "what shape is at the top?"), ("gpt", "a blue square.")],
           [("human", "what is on the left?"), ("gpt", "a small star.")]]  # the view adds it
  records = [{"image": rng.integers(0, 256, (16, 16, 3)).astype(np.uint8), "system": "",
              "conversations": [{"from": who, "value": text} for who, text in t]}
             for t in turns]
  examples = [view.map(r) for r in records]
  batch = {k: np.stack([e[k] for e in examples]) for k in ("text", "mask_ar", "mask_loss",
                                                          "image")}
  spec = view.spec(1)
  params = _random_params(bound.model, *get_family("llava").model_inputs(
      bound.prepare({k: np.zeros((1,) + s.shape[1:], s.dtype) for k, s in spec.items()})))
  return dict(bound=bound, params=params, batch=batch, view=view, records=records,
              tokenizer=tokenizer)


def test_the_loss_is_the_nll_of_the_assistant_tokens_alone(chat):
  bound, params, batch, tok = chat["bound"], chat["params"], chat["batch"], chat["tokenizer"]
  per_image = bound.model.num_image_tokens(16)
  rng = jax.random.key(0)
  text = batch["text"]
  # Where each view token lands in the model's sequence: after the placeholder, P - 1 later.
  placeholder = np.argmax(text == tok.token_id("<image>"), axis=1)
  length = text.shape[1] + per_image - 1  # the model's targets: the expanded text but its first

  def loss_with(delta):
    def add(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, llava.Llava) and context.method_name == "__call__":
        out = {**out, "logits": out["logits"] + delta}
      return out

    with nn.intercept_methods(add):
      return bound.loss(params, batch, rng)[0]

  zeros = jnp.zeros((3, length, bound.model.lm_fields()["vocab_size"]))
  grad = np.asarray(jax.jit(jax.grad(loss_with))(zeros))
  scored = np.abs(grad).sum(-1) > 0
  want = np.zeros_like(scored)
  for row in range(3):
    # The chat view writes one placeholder per conversation (row 2's into its first turn);
    # every token after it moves P - 1 places, and target t predicts token t + 1.
    assert placeholder[row] > 0
    for j in np.flatnonzero(batch["mask_loss"][row]):
      want[row, j + per_image - 2] = True
  np.testing.assert_array_equal(scored, want)
  # The scored targets are exactly the replies and their eos.
  replies = [("the circle is red.",), ("two.", "a blue square."), ("a small star.",)]
  for row, turns in enumerate(replies):
    ids = text[row][batch["mask_loss"][row] == 1]
    assert (ids == tok.eos_id).sum() == len(turns)  # each reply ends with eos
    reply = " ".join(turns)
    assert tok.decode([ids[ids != tok.eos_id]])[0].split() == reply.split()
  # Perturbing the logits of every other position leaves the loss bitwise unchanged.
  noise = 30.0 * jax.random.normal(jax.random.key(2), zeros.shape)
  base = float(jax.jit(loss_with)(zeros))
  assert float(jax.jit(loss_with)(jnp.where(want[..., None], 0.0, noise))) == base
  assert float(jax.jit(loss_with)(jnp.where(want[..., None], noise, 0.0))) != base
  # token_nll (the perplexity evaluator's) sums to the same loss.
  out = jax.jit(lambda p, b: bound.predict("token_nll", p, b))(params, batch)
  assert float(np.sum(out["nll"]) / np.sum(out["tokens"])) == pytest.approx(base, rel=1e-5)
  assert np.sum(out["tokens"]) == want.sum()


def test_generation_equals_greedy_recomputation_on_chat_and_vqa_prompts(chat):
  bound, params, tok = chat["bound"], chat["params"], chat["tokenizer"]
  model = bound.model
  per_image, new = model.num_image_tokens(16), 4
  vqa = VqaView(tok, 40, image_size=16)
  images = np.stack([r["image"] for r in chat["records"]])
  prompts = [chat["view"].prompt(chat["records"][0]), chat["view"].prompt(chat["records"][1]),
             vqa.prompt({"image": images[2], "question": "what is on the left?",
                         "answers": ["star"]})]
  inputs = {k: np.stack([p[k] for p in prompts]) for k in ("text", "mask_ar", "mask_loss",
                                                          "prompt_len", "image")}
  generated = np.asarray(jax.jit(lambda p, i: bound.predict("generate", p, i,
                                                            max_new_tokens=new))(params, inputs))
  assert generated.shape == (3, new)

  # Greedy by recomputation: the expanded prompt (NumPy), then one full forward per token.
  image_id = tok.token_id("<image>")
  rows = []
  for prompt in prompts:
    ids = list(prompt["text"][:int(prompt["prompt_len"])])
    if image_id in ids:
      at = ids.index(image_id)
      ids = ids[:at] + [image_id] * per_image + ids[at + 1:]
    else:
      ids = ids[:1] + [image_id] * per_image + ids[1:]
    rows.append(ids)
  width = max(map(len, rows)) + new
  forward = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t)["logits"])
  pixels = bound.prepare({"image": images})["image"][:, None]
  for step in range(new):
    tokens = np.full((3, width), tok.pad_id, np.int32)
    for row, ids in enumerate(rows):
      tokens[row, :len(ids)] = ids
    logits = np.asarray(forward(params, pixels, tokens))
    for row, ids in enumerate(rows):
      if generated[row, step] == tok.pad_id:
        continue  # stopped
      top = np.sort(logits[row, len(ids) - 1])[-2:]
      assert top[1] - top[0] > 1e-3  # no near-tie to flip
      assert np.argmax(logits[row, len(ids) - 1]) == generated[row, step], (row, step)
      ids.append(int(generated[row, step]))


def test_llava_1_5_presets_have_the_released_parameter_counts():
  """llava-hf/llava-1.5-7b-hf and -13b-hf hold 7,063,427,072 and 13,351,494,656 parameters
  (their safetensors totals; see the counts below). vljax's tower stops at the penultimate
  layer, so it holds one CLIP ViT-L layer (12,596,224) and the post-LayerNorm (2,048) fewer."""
  clip_layer = 4 * (1024 * 1024 + 1024) + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024
  assert clip_layer == 12_596_224
  for variant, released in (("llava-1.5-7b", 7_063_427_072), ("llava-1.5-13b", 13_351_494_656)):
    model = llava.Llava(variant=variant, scan=True, check_image_tokens=False)
    assert model.num_image_tokens(llava.PAPER_IMAGE_SIZE) == 576
    images = jax.ShapeDtypeStruct((1, 1, 336, 336, 3), jnp.float32)
    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    abstract = jax.eval_shape(lambda i, t, m=model: m.init(jax.random.PRNGKey(0), i, t)["params"],
                              images, tokens)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(abstract)))
    assert count == released - clip_layer - 2 * 1024, variant
    assert abs(count - released) / released < 0.01
