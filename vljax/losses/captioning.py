"""Captioning (next-token) loss shared by the generative families: CoCa, BLIP, PaLI, ...

Text is right-padded [BOS w_1 .. w_n EOS pad ..]; the model reads every token but the last and
predicts every token but the first; which targets carry loss is the example's mask_loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def decoder_inputs(text_bt: jax.Array) -> jax.Array:
  """What a decoder reads of a text: every token but the last (see `next_token_targets`)."""
  return text_bt[:, :-1]


def next_token_targets(text_bt: jax.Array, mask_loss_bt: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The one decoder-input shift: (inputs_bt, targets_bt, weights_bt) = (text[:, :-1],
  text[:, 1:], mask_loss[:, 1:]).

  `mask_loss[i]` says whether token i is scored (predicted from the tokens before it), as
  big_vision's mask_loss; the views of `vljax.data.views` write it, so no loss guesses from a
  pad id which tokens count.
  """
  return decoder_inputs(text_bt), text_bt[:, 1:], mask_loss_bt[:, 1:].astype(bool)


def decoder_input_length(max_text_len: int) -> int:
  """Length of the decoder inputs `next_token_targets` gives for texts of `max_text_len`."""
  return max_text_len - 1


def token_nll(logits_btv: jax.Array, targets_bt: jax.Array) -> jax.Array:
  """float32 [B, T] negative log-likelihoods of the targets, logsumexp(logits) - logits[target]
  in float32 whatever the logits dtype (no float32 copy of the log-probabilities is kept)."""
  logits_btv = logits_btv.astype(jnp.float32)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits_btv, axis=-1) - target_logit_bt


def captioning_sums(nll_bt: jax.Array, correct_bt: jax.Array, mask_bt: jax.Array
                    ) -> dict[str, jax.Array]:
  """The additive statistics of the captioning loss over a batch: float32 sums of the scored
  tokens' NLL ("cap_nll"), of their correct argmax predictions ("cap_correct") and their number
  ("cap_tokens"). Sums over microbatches add up to the whole batch's (`captioning_from_sums`)."""
  weight_bt = mask_bt.astype(jnp.float32)
  return {"cap_nll": jnp.sum(nll_bt * weight_bt),
          "cap_correct": jax.lax.stop_gradient(jnp.sum(correct_bt.astype(jnp.float32) * weight_bt)),
          "cap_tokens": jnp.sum(weight_bt)}


def captioning_from_sums(sums: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) from `captioning_sums`: the token-weighted mean NLL over the scored tokens
  (0, not NaN, when there are none); metrics cap_loss, cap_accuracy, cap_tokens."""
  denominator = jnp.maximum(sums["cap_tokens"], 1.0)
  loss = sums["cap_nll"] / denominator
  return loss, {"cap_loss": loss, "cap_accuracy": sums["cap_correct"] / denominator,
                "cap_tokens": sums["cap_tokens"]}


def logits_captioning_sums(logits_btv: jax.Array, targets_bt: jax.Array,
                           mask_bt: jax.Array) -> dict[str, jax.Array]:
  """`captioning_sums` of full logits [B, T, V]."""
  correct_bt = jnp.argmax(logits_btv, axis=-1) == targets_bt
  return captioning_sums(token_nll(logits_btv, targets_bt), correct_bt, mask_bt)


def captioning_loss(logits_btv: jax.Array, targets_bt: jax.Array,
                    mask_bt: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token cross-entropy averaged over the tokens where `mask_bt` is True; returns (loss, metrics).

  The log-normaliser is computed in float32 whatever the logits dtype, as
  logsumexp(logits) - logits[target], so no float32 copy of the log-probabilities is kept.
  metrics: cap_loss, cap_accuracy (argmax == target over the counted tokens), cap_tokens.
  """
  return captioning_from_sums(logits_captioning_sums(logits_btv, targets_bt, mask_bt))
