"""Sentence log-probabilities from a causal language model in JAX, for the n-best rescoring pass.

The model is a HuggingFace-format directory (config.json, tokenizer files, Flax weights `flax_model.msgpack`,
or PyTorch weights that transformers converts when torch is installed) loaded with transformers' Flax classes
(`FlaxAutoModelForCausalLM`: GPT-2, GPT-Neo, GPT-J, OPT, Llama, Mistral, Gemma, ...), so it runs on whatever
device JAX runs on — the TPU that computed the logits. Never a download: only local files are read.

A sentence is scored as `<bos> tokens <eos>`: ln P = Σ ln p(token_t | tokens_<t) over the tokens and the end
token (models without a start token start from their end token, as GPT-2 does). Sentences are padded to the
next power of two in tokens and grouped `batch_size` at a time, so the forward pass compiles once per padded
length (a few lengths per run).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

MIN_PADDED_TOKENS = 8  # shortest padded length: tiny sentences share one compiled shape


def padded_length(n: int) -> int:
  """The next power of two >= n (and >= MIN_PADDED_TOKENS): the padded sequence lengths a run compiles for."""
  return max(MIN_PADDED_TOKENS, 1 << max(n - 1, 0).bit_length())


def _sequence_log_probs(params, input_ids, mask, *, model) -> jax.Array:
  """Σ over positions t >= 1 with mask[t] of ln p(input_ids[t] | input_ids[:t]), per row."""
  logits = model(input_ids, attention_mask=mask, params=params, train=False).logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  target = jnp.take_along_axis(logp, input_ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask[:, 1:] > 0, target, 0.0), axis=-1)


class CausalLMScorer:
  """ln P(sentence) under the causal LM in directory `path` (see the module doc)."""

  def __init__(self, path: str, *, batch_size: int):
    if not os.path.isdir(path):
      raise FileNotFoundError(
        f"config.decode.rescore.path={path!r} is not a directory; give a local HuggingFace-format model "
        "directory (config.json, tokenizer, weights)"
      )
    has_flax = any(f.startswith("flax_model") for f in os.listdir(path))
    if has_flax:
      # transformers imports torch when it is installed (a 3-30 s import) unless told not to; Flax weights need no
      # torch. Only effective before transformers' first import in this process.
      os.environ.setdefault("USE_TORCH", "0")
    try:
      from transformers import AutoTokenizer, FlaxAutoModelForCausalLM  # heavy import: only for this rescorer
    except ImportError as e:
      raise ImportError(
        f"config.decode.rescore.kind='causal_lm' needs transformers 4.57.x (the last with Flax models): "
        f"pip install -e '.[lm]' (make setup does) ({e})"
      ) from e

    self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    self.model, self.params = FlaxAutoModelForCausalLM.from_pretrained(
      path, _do_init=False, local_files_only=True, from_pt=not has_flax
    )
    tok = self.tokenizer
    self.eos = tok.eos_token_id
    self.bos = tok.bos_token_id if tok.bos_token_id is not None else self.eos
    if self.bos is None:
      raise ValueError(f"{path}: the tokenizer has neither a start (bos) nor an end (eos) token to start a sentence")
    self.batch_size = batch_size
    self._log_probs = jax.jit(functools.partial(_sequence_log_probs, model=self.model))
    logging.info("causal LM %s: %s, %d parameters", path, type(self.model).__name__, self.n_params)

  @property
  def n_params(self) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(self.params)))

  def token_ids(self, sentence: str) -> list[int]:
    """`<bos> tokens <eos>` of one sentence."""
    ids = self.tokenizer(sentence, add_special_tokens=False)["input_ids"]
    return [self.bos, *ids, *([] if self.eos is None else [self.eos])]

  def __call__(self, sentences: Sequence[str]) -> np.ndarray:
    seqs = [self.token_ids(s) for s in sentences]
    out = np.empty(len(seqs), np.float64)
    order = np.argsort([len(s) for s in seqs], kind="stable")  # similar lengths share a padded batch
    for start in range(0, len(seqs), self.batch_size):
      rows = order[start : start + self.batch_size]
      length = padded_length(max(len(seqs[r]) for r in rows))
      ids = np.zeros((self.batch_size, length), np.int32)
      mask = np.zeros((self.batch_size, length), np.int32)
      for k, r in enumerate(rows):
        ids[k, : len(seqs[r])] = seqs[r]
        mask[k, : len(seqs[r])] = 1
      mask[len(rows) :, 0] = 1  # padding rows: one visible token keeps the attention softmax finite
      out[rows] = np.asarray(self._log_probs(self.params, jnp.asarray(ids), jnp.asarray(mask)))[: len(rows)]
    return out
