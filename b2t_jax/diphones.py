"""Diphone targets (`config.model.targets` = `diphone` | `both`): CTC over (previous, current) phoneme pairs, as in
DCoND (Li et al. 2024, the Brain-to-Text '24 winner), marginalised back to the 41 phoneme classes of SPEC §2.

Class layout. N = `model.n_classes` (41) phoneme classes, of which K = N - 1 (40: 39 phonemes and the word
boundary ` | `, ids 1..K) are not the blank; the diphone head has 1 + K * K (1601) classes:
- index 0 is the CTC blank, as for phonemes. A blank has no context: it is one class, whatever surrounds it.
- the diphone (prev, cur), prev and cur phoneme ids in 1..K, is index `1 + (prev - 1) * K + (cur - 1)`: row-major
  over (prev, cur), so indices 1..K are the pairs (AA, cur) and the last index, K * K, is ( | ,  | ).

Boundary rule (labels). A trial's phonemes y_1 .. y_L become the L diphones (y_0, y_1), (y_1, y_2), ..,
(y_{L-1}, y_L) with y_0 = ` | ` (`vocab.SIL_ID`): a sentence starts in silence. The label length is unchanged; a
repeated phoneme (A A) gives two different diphones ((x, A), (A, A)), so only a run of three (A A A) repeats a
diphone: a diphone label sequence never needs more CTC frames than its phonemes (`losses.decoder_loss` keeps the
phonemes' feasibility rule for every head, so the same trials train whatever the targets).

Marginalisation. p(cur = c) = sum over prev of p(prev, c) for c in 1..K, and p(blank) = p(blank): in log space a
logsumexp over the prev axis of the (K, K) block of the diphone log-softmax. The N log-probabilities sum to one.
Everything downstream of the model (PER, val loss, streaming, word decoding, ensembles, logits.npz) reads them.

Parametrisation (`model.diphone_head`). `flat`: one Dense to the 1 + K^2 logits. `factored` (the default): the
logit of (prev, cur) is a phoneme logit u[cur] plus a context term v[prev, cur] (and the blank's u[0] + log K plus
v[blank]), with v's Dense initialised to zero. Both span the same logits (v alone is a full 1 + K^2 Dense); they
differ in where training starts. At v = 0 the marginals are exactly softmax(u), a phoneme head, and each diphone
is its phoneme's probability over K whatever came before: the joint objective's phoneme CTC trains u as it trains a
phoneme head from the first step, while v learns what the context adds. With `flat`, 1,600 rarely seen classes start
uniform (demo, 600 steps: val PER 0.950 flat, 0.605 factored, phonemes 0.437; README, "Diphone targets").

Objective (`losses.decoder_loss`): the diphone CTC plus `loss.marginal_ctc_weight` x the phoneme CTC of the
marginals, both through the one diphone head (DCoND's joint loss, alpha * phoneme + (1 - alpha) * diphone); `both`
adds `loss.phoneme_ctc_weight` x the CTC of a separate phoneme head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from b2t_jax.vocab import SIL_ID

TARGETS = ("phoneme", "diphone", "both")  # config.model.targets
HEADS = ("factored", "flat")  # config.model.diphone_head


def is_factored(targets: str, diphone_head: str) -> bool:
  """Whether the speech head is the `factored` diphone head (it has the phoneme logits `diphone_base`)."""
  return targets != "phoneme" and diphone_head == "factored"


def n_diphone_classes(n_classes: int) -> int:
  """Classes of the diphone head for `n_classes` phoneme classes (blank included): 1 + (n_classes - 1)^2."""
  return 1 + (n_classes - 1) ** 2


def head_classes(targets: str, n_classes: int) -> int:
  """Width of the speech decoder's main head for `config.model.targets`."""
  if targets not in TARGETS:
    raise ValueError(f"config.model.targets={targets!r}: expected one of {', '.join(TARGETS)}")
  return n_classes if targets == "phoneme" else n_diphone_classes(n_classes)


def diphone_index(prev, cur, n_classes: int):
  """Index of the diphone (prev, cur) (phoneme ids in 1..n_classes-1; NumPy or JAX integers, broadcast)."""
  k = n_classes - 1
  return 1 + (prev - 1) * k + (cur - 1)


def diphone_labels(labels: jax.Array, label_lens: jax.Array, n_classes: int) -> jax.Array:
  """Phoneme labels (B, L) with `label_lens` valid ids each -> diphone labels (B, L): label i is
  (labels[i-1], labels[i]), the first one's prev the word boundary; padding positions stay 0 (CTC reads only the
  first `label_lens`)."""
  prev = jnp.concatenate([jnp.full_like(labels[:, :1], SIL_ID), labels[:, :-1]], axis=1)
  valid = jnp.arange(labels.shape[1])[None, :] < label_lens[:, None]
  return jnp.where(valid, diphone_index(prev, labels, n_classes), 0).astype(labels.dtype)


def marginal_log_probs(diphone_logits: jax.Array, n_classes: int) -> jax.Array:
  """(..., 1 + K^2) diphone logits -> (..., n_classes) phoneme log-probabilities (fp32): blank -> blank,
  log p(cur) = logsumexp over prev of log p(prev, cur)."""
  k = n_classes - 1
  lp = jax.nn.log_softmax(diphone_logits.astype(jnp.float32), axis=-1)
  # the layout puts the blank first in both vocabularies (vocab.BLANK_ID = 0), the (prev, cur) block after it
  pairs = lp[..., 1:].reshape(*lp.shape[:-1], k, k)  # (..., prev, cur)
  return jnp.concatenate([lp[..., :1], jax.scipy.special.logsumexp(pairs, axis=-2)], axis=-1)


def factored_logits(phoneme_logits: jax.Array, context_logits: jax.Array, n_classes: int) -> jax.Array:
  """The `factored` head: phoneme logits u (..., n_classes) and context logits v (..., 1 + K^2) -> diphone logits
  (..., 1 + K^2): [u[0] + log K + v[0], u[cur] + v[(prev, cur)] ...]. With v = 0 the marginals equal softmax(u)."""
  k = n_classes - 1
  u = phoneme_logits.astype(jnp.float32)
  blank = u[..., :1] + jnp.log(jnp.float32(k))  # the blank's one class stands for the K (prev, cur) slots of a phoneme
  pairs = jnp.broadcast_to(u[..., None, 1:], (*u.shape[:-1], k, k)).reshape(*u.shape[:-1], k * k)
  return jnp.concatenate([blank, pairs], axis=-1) + context_logits.astype(jnp.float32)
