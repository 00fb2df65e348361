"""CTC with infeasible-trial masking (SPEC §4), the triple objective (SPEC §3.4) and the diphone targets' CTC
(`b2t_jax/diphones.py`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from b2t_jax import diphones
from b2t_jax.vocab import BLANK_ID


def min_ctc_frames(labels: jax.Array, label_lens: jax.Array) -> jax.Array:
  """Fewest frames a CTC path needs: one per label plus a blank between each pair of equal neighbours."""
  valid = jnp.arange(labels.shape[1])[None, :] < label_lens[:, None]
  repeats = (labels[:, 1:] == labels[:, :-1]) & valid[:, 1:]
  return label_lens + repeats.sum(axis=1).astype(label_lens.dtype)


def feasible_mask(input_lens: jax.Array, labels: jax.Array, label_lens: jax.Array) -> jax.Array:
  """True where the labels fit in `input_lens` CTC frames."""
  return (input_lens >= 1) & (min_ctc_frames(labels, label_lens) <= input_lens)


def ctc_per_trial(
  logits: jax.Array, input_lens: jax.Array, labels: jax.Array, label_lens: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Per-trial CTC negative log-likelihood (summed over time, `optax.ctc_loss`) and a feasibility mask.

  A trial is infeasible when its labels cannot fit its `input_lens` frames; optax then returns ~1e5 with
  non-zero gradients, so callers must weight it by the mask. Loss is computed in fp32.
  """
  b, p, _ = logits.shape
  logit_pad = (jnp.arange(p)[None, :] >= input_lens[:, None]).astype(jnp.float32)
  label_pad = (jnp.arange(labels.shape[1])[None, :] >= label_lens[:, None]).astype(jnp.float32)
  nll = optax.ctc_loss(logits.astype(jnp.float32), logit_pad, labels, label_pad, blank_id=BLANK_ID)
  return nll, feasible_mask(input_lens, labels, label_lens)


def masked_mean(values: jax.Array, weights: jax.Array, denom: jax.Array | None = None) -> jax.Array:
  """sum(values * weights) / denom, where denom defaults to max(sum(weights), 1). Masked values never leak
  (a NaN/1e5 loss of a masked trial is replaced, not multiplied by 0)."""
  denom = jnp.maximum(weights.sum(), 1.0) if denom is None else denom
  return jnp.where(weights > 0, values, 0.0).dot(weights) / denom


def decoder_loss(
  outputs,
  input_lens,
  labels,
  label_lens,
  weights,
  *,
  noisy_weight: float,
  noise_l2_weight: float,
  intermediate_weight: float = 0.0,
  phoneme_weight: float = 0.0,
  marginal_weight: float = 0.0,
  denom: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
  """Mean CTC over trials with weight > 0 (after masking infeasible ones) of a model's 'full' outputs
  ({'logits', 'intermediate', for diphone targets 'diphone_logits' (and 'phoneme_logits' for both), and for the
  triple model 'noisy_logits', 'noise'}):

    CTC(main) [diphone/both] + marginal_weight * CTC(logits) [both] + phoneme_weight * CTC(phoneme_logits)
              + intermediate_weight * mean_k CTC(intermediate_k)
              [triple] + noisy_weight * CTC(noisy_logits) + noise_l2_weight * mean(noise^2)

  The main CTC ('ctc' in the metrics) is that of 'diphone_logits' on the diphone labels (diphones.diphone_labels)
  when the model has a diphone head, else that of 'logits' on the phonemes; every other head is phoneme-level.
  With a diphone head, 'logits' are its phoneme marginals: their CTC ('ctc_marginal', DCoND's joint objective)
  trains the diphone head on the phonemes too.
  A trial is feasible when its phonemes fit its frames, for every head: diphone labels never need more frames.
  `weights` (B,) is 1 for real trials and 0 for padding rows. Returns (loss, aux metrics).
  """
  feasible = feasible_mask(input_lens, labels, label_lens)
  if "diphone_logits" in outputs:
    n_classes = outputs["logits"].shape[-1]  # the phoneme classes the diphones are pairs of
    targets = diphones.diphone_labels(labels, label_lens, n_classes)
    nll, _ = ctc_per_trial(outputs["diphone_logits"], input_lens, targets, label_lens)
  else:
    nll, _ = ctc_per_trial(outputs["logits"], input_lens, labels, label_lens)
  w = weights * feasible.astype(jnp.float32)
  ctc = masked_mean(nll, w, denom)
  aux = {"ctc": ctc, "n_infeasible": jnp.sum((weights > 0) & ~feasible), "n_trials": jnp.sum(w)}
  loss = ctc
  if "diphone_logits" in outputs and marginal_weight:
    aux["ctc_marginal"] = masked_mean(ctc_per_trial(outputs["logits"], input_lens, labels, label_lens)[0], w, denom)
    loss = loss + marginal_weight * aux["ctc_marginal"]
  if "phoneme_logits" in outputs:
    aux["ctc_phoneme"] = masked_mean(
      ctc_per_trial(outputs["phoneme_logits"], input_lens, labels, label_lens)[0], w, denom
    )
    loss = loss + phoneme_weight * aux["ctc_phoneme"]
  intermediate = outputs.get("intermediate", ())
  if intermediate:
    # the same trials as the final head: every head reads the same patches
    aux["ctc_intermediate"] = sum(
      masked_mean(ctc_per_trial(lg, input_lens, labels, label_lens)[0], w, denom) for lg in intermediate
    ) / len(intermediate)
    loss = loss + intermediate_weight * aux["ctc_intermediate"]
  if "noisy_logits" in outputs:
    noisy_nll, _ = ctc_per_trial(outputs["noisy_logits"], input_lens, labels, label_lens)
    aux["ctc_noisy"] = masked_mean(noisy_nll, w, denom)
    loss = loss + noisy_weight * aux["ctc_noisy"]
    if noise_l2_weight:
      aux["noise_l2"] = jnp.mean(jnp.square(outputs["noise"].astype(jnp.float32)))
      loss = loss + noise_l2_weight * aux["noise_l2"]
  return loss, aux
