"""The CoCa family: contrastive + captioning losses (weights config.loss.contrastive_weight and
caption_weight; the paper's 1 and 2; with config.loss.ce_chunk_len the vocabulary projection
and cross-entropy run that many text positions at a time, never holding the [batch, length,
vocab] logits); predicts embeddings, generated text and token likelihoods. It trains on captions, and on any view with a loss mask (VQA, grounding, video
captions), where the contrastive term pairs the image with the view's whole text."""
from __future__ import annotations

import jax.numpy as jnp

from vljax.families.base import Family
from vljax.losses.captioning import (captioning_from_sums, captioning_sums, decoder_input_length,
                                     decoder_inputs, logits_captioning_sums, next_token_targets,
                                     token_nll)
from vljax.losses.chunked_ce import chunked_token_nll
from vljax.models import coca
from vljax.models.vit import ViT


def _model_fields(config, tokenizer) -> dict:
  return {"contrastive": config.loss.contrastive, "vocab_size": tokenizer.vocab_size,
          "max_len": decoder_input_length(config.data.max_text_len), "pad_id": tokenizer.pad_id}


def _loss_terms(bound, params, batch, rng):
  inputs_bt, targets_bt, weights_bt = next_token_targets(batch["text"], batch["mask_loss"])
  chunk = bound.config.loss.ce_chunk_len
  outputs = bound.apply(params, batch["image"], inputs_bt, train=True, rng=rng,
                        caption_hidden=bool(chunk))
  terms = bound.contrastive_terms(outputs)
  if chunk:  # the vocabulary projection fused with the cross-entropy, `chunk` positions at a time
    model = bound.model
    kernel = (params["token_embedding"]["embedding"] if model.tied_output
              else params["head"]["dense"]["kernel"])
    nll_bt, correct_bt = chunked_token_nll(
        outputs["caption_hidden"], kernel, targets_bt, chunk_size=chunk, dtype=model.dtype,
        transpose_kernel=model.tied_output)
    sums = captioning_sums(nll_bt, correct_bt, weights_bt)
  else:
    sums = logits_captioning_sums(outputs["logits"], targets_bt, weights_bt)
  return terms._replace(sums=sums)


def _combine(bound, terms):
  con_loss, con_metrics = bound.contrastive_loss({**terms.examples, **terms.shared})
  cap_loss, cap_metrics = captioning_from_sums(terms.sums)
  cfg = bound.config.loss
  loss = cfg.contrastive_weight * con_loss + cfg.caption_weight * cap_loss
  return loss, {**con_metrics, **cap_metrics, "con_loss": con_loss, "loss": loss}


def _embed_images(bound, params, inputs):
  return bound.apply(params, inputs["image"], None)["zimg"]


def _embed_texts(bound, params, inputs):
  # Training embeds the decoder inputs (the shifted text), so do we.
  return bound.apply(params, None, decoder_inputs(inputs["text"]))["ztxt"]


def _generate(bound, params, inputs, *, max_new_tokens: int):
  tok = bound.tokenizer
  return coca.generate(bound.model, params, inputs["image"], max_new_tokens=max_new_tokens,
                       bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=bound.model.pad_id,
                       prompt_bl=inputs["text"], prompt_len_b=inputs["prompt_len"])


def _token_nll(bound, params, inputs):
  inputs_bt, targets_bt, weights_bt = next_token_targets(inputs["text"], inputs["mask_loss"])
  nll_bt = token_nll(bound.apply(params, inputs["image"], inputs_bt)["logits"], targets_bt)
  weights_bt = weights_bt.astype(jnp.float32)
  return {"nll": jnp.sum(nll_bt * weights_bt, axis=1), "tokens": jnp.sum(weights_bt, axis=1)}


FAMILY = Family(
    name="coca", module=coca.CoCa, model_fields=_model_fields,
    model_inputs=lambda batch: (batch["image"], decoder_inputs(batch["text"])),
    loss_terms=_loss_terms, combine=_combine,
    predict={"embed_images": _embed_images, "embed_texts": _embed_texts, "generate": _generate,
             "token_nll": _token_nll},
    views=("caption", "vqa", "grounding"), submodules={"image": ViT})
