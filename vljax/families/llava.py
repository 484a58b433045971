"""The LLaVA family: a vision tower and projector in front of a decoder LM
(`vljax.models.llava.Llava`), trained with the next-token cross-entropy on the tokens the view's
loss mask scores (the chat view's: the assistant replies and their eos; never the system prompt,
the user turns or the image tokens), attending as the view's mask_ar says.

Views write one "<image>" token per image (chat) or none (vqa, caption); the family expands each
into the P image tokens of the batch's image size, or puts them after the bos of a text without
one (`vljax.models.llava.expand_image_tokens`), so one model trains on conversations, questions
and captions (LLaVA's stage 1 is captions, stage 2 conversations) and the VQA, captioning and
perplexity evaluators read it through the same predict functions as the "lm" family. With
config.loss.ce_chunk_len the vocabulary projection and cross-entropy run that many positions at
a time; the loss terms are sums, so microbatches add up to the whole batch's loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from vljax.data.views.base import IMAGE_TOKEN
from vljax.errors import ConfigError
from vljax.families.base import Family, LossTerms
from vljax.losses.captioning import (captioning_from_sums, captioning_sums, next_token_targets,
                                     token_nll)
from vljax.losses.chunked_ce import chunked_token_nll
from vljax.models import llava
from vljax.models.lm import LM
from vljax.models.vit import ViT
from vljax.nn.masks import attention_mask


def _placeholder_id(tokenizer) -> int | None:
  """The tokenizer's "<image>" id, or None for one without it (its texts never hold it)."""
  try:
    return int(tokenizer.token_id(IMAGE_TOKEN))
  except KeyError:
    return None


def _model_fields(config, tokenizer) -> dict:
  fields = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
  try:
    per_image = llava.Llava(**fields).num_image_tokens(config.data.image_size)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from e
  derived = {"lm.vocab_size": tokenizer.vocab_size,
             # Every text position plus one image's tokens.
             "lm.max_len": config.data.max_text_len + per_image}
  image_id = _placeholder_id(tokenizer)
  if image_id is not None:
    derived["image_token_id"] = image_id
  return derived


def _model_text(bound, batch) -> dict[str, jax.Array]:
  """The batch's text, masks (and prompt_len) with each image's P tokens in place; "image"
  marks them."""
  images, text_bl = batch["image"], batch["text"]
  if images.ndim != 4 or text_bl.ndim != 2:
    raise ValueError(f"family 'llava' reads one image [B, H, W, 3] and one text [B, L] per "
                     f"example, got image {images.shape} and text {text_bl.shape} (grouped "
                     "captions are not supported)")
  model = bound.model
  image_id = model.image_token_id
  return llava.expand_image_tokens(
      text_bl, batch["mask_ar"], batch["mask_loss"],
      image_token_id=-1 if image_id is None else image_id,
      tokens_per_image=model.num_image_tokens(images.shape[1:3]), max_images=1,
      prompt_len_b=batch.get("prompt_len"), pad_id=bound.tokenizer.pad_id)


def _forward(bound, params, batch, **kw):
  """(outputs, targets_bt, weights_bt): the model reads the expanded text but its last token
  under the view's attention mask and predicts the text from its second token."""
  x = _model_text(bound, batch)
  inputs_bt, targets_bt, weights_bt = next_token_targets(x["text"], x["mask_loss"])
  mask = attention_mask(x["mask_ar"][:, :-1])
  image_mask_bn = jnp.ones((inputs_bt.shape[0], 1), bool)
  outputs = bound.apply(params, batch["image"], inputs_bt, image_mask_bn, x["image"][:, :-1],
                        mask=mask, hidden_only=bool(bound.config.loss.ce_chunk_len), **kw)
  return outputs, targets_bt, weights_bt


def _score(bound, params, outputs, targets_bt) -> tuple[jax.Array, jax.Array]:
  """(nll_bt, correct_bt): from the logits, or with config.loss.ce_chunk_len from the hidden
  states and the LM's output kernel, by chunks."""
  chunk = bound.config.loss.ce_chunk_len
  if not chunk:
    logits_btv = outputs["logits"]
    return token_nll(logits_btv, targets_bt), jnp.argmax(logits_btv, axis=-1) == targets_bt
  tied = bound.model.lm_module().config()["tied_head"]
  lm_params = params["language_model"]
  kernel = (lm_params["token_embedding"]["embedding"] if tied
            else lm_params["head"]["dense"]["kernel"])
  return chunked_token_nll(outputs["hidden"], kernel, targets_bt, chunk_size=chunk,
                           dtype=bound.model.dtype, transpose_kernel=tied)


def _loss_terms(bound, params, batch, rng) -> LossTerms:
  outputs, targets_bt, weights_bt = _forward(bound, params, batch, train=True, rng=rng)
  nll_bt, correct_bt = _score(bound, params, outputs, targets_bt)
  return LossTerms(examples={}, shared={}, sums=captioning_sums(nll_bt, correct_bt, weights_bt))


def _combine(bound, terms):
  loss, metrics = captioning_from_sums(terms.sums)
  return loss, {**metrics, "loss": loss}


def _token_nll(bound, params, inputs):
  outputs, targets_bt, weights_bt = _forward(bound, params, inputs)
  nll_bt, correct_bt = _score(bound, params, outputs, targets_bt)
  weights_bt = weights_bt.astype(jnp.float32)
  return {"nll": jnp.sum(nll_bt * weights_bt, axis=1), "tokens": jnp.sum(weights_bt, axis=1),
          "correct": jnp.sum(correct_bt.astype(jnp.float32) * weights_bt, axis=1)}


def _generate(bound, params, inputs, *, max_new_tokens: int):
  """Greedy continuations of the prompts (the image tokens in place), with the LM's KV cache."""
  x = _model_text(bound, inputs)
  tok = bound.tokenizer
  image_mask_bn = jnp.ones((x["text"].shape[0], 1), bool)
  return llava.generate(bound.model, params, inputs["image"], x["text"],
                        image_mask_bn=image_mask_bn, image_positions_bl=x["image"],
                        prompt_len_b=x["prompt_len"], max_new_tokens=max_new_tokens,
                        eos_id=tok.eos_id, pad_id=tok.pad_id)


FAMILY = Family(
    name="llava", module=llava.Llava, model_fields=_model_fields,
    # A zero batch has no image tokens: its image is marked absent, so the counts agree.
    model_inputs=lambda batch: (batch["image"], batch["text"][:, :-1],
                                jnp.zeros((batch["image"].shape[0], 1), bool),
                                jnp.zeros(batch["text"][:, :-1].shape, bool)),
    loss_terms=_loss_terms, combine=_combine,
    predict={"generate": _generate, "token_nll": _token_nll},
    views=("chat", "vqa", "caption"), submodules={"vision": ViT, "lm": LM})
