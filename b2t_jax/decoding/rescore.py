"""The second pass of word decoding: rescoring each trial's n-best list with a stronger language model.

A sentence scorer maps sentences to natural-log probabilities ln P(sentence) (`config.decode.rescore.kind`):
- `ngram`: a word n-gram LM of any order, ARPA or KenLM binary (KenLM inside flashlight-text), log10 scores
  converted to natural log; `<s>` and `</s>` are scored, words outside its vocabulary score as `<unk>`;
- `causal_lm`: a causal language model from a local directory, in JAX (decoding/causal_lm.py);
- `callable`: a user's `module:function` taking a list of sentences and returning their natural-log
  probabilities.
Hypothesis h of a trial then scores `total(h) + weight · ln P(h) + word_bonus · #words(h)`, the first-pass
total being the beam's own score (beam_search.Hypothesis), and the best of the list wins (ties: first-pass
order). With `gate_margin` > 0 only trials whose first-pass margin (best minus second-best total) is below it
are rescored, as the Brain-to-Text '25 entries bound their LLM time; 0 rescores every trial.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from b2t_jax.decoding.beam_search import Hypothesis
from b2t_jax.decoding.lexicon import UNK_WORD

KINDS = ("none", "ngram", "causal_lm", "callable")
LN10 = math.log(10.0)

SentenceScorer = Callable[[Sequence[str]], np.ndarray]


class NgramScorer:
  """ln P(sentence) under a KenLM-readable word n-gram LM (ARPA or binary, any order)."""

  def __init__(self, path: str, vocabulary: Iterable[str]):
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    if not os.path.exists(path):
      raise FileNotFoundError(
        f"config.decode.rescore.path={path!r} does not exist; build an n-gram LM with tools/build_lm.py"
      )
    # flashlight's KenLM maps a word index of this dictionary to the LM's own word id once, at construction.
    self.words = Dictionary()
    for w in dict.fromkeys([*vocabulary, UNK_WORD]):
      self.words.add_entry(w)
    self.unk = self.words.get_index(UNK_WORD)
    self.lm = KenLM(path, self.words)

  def __call__(self, sentences: Sequence[str]) -> np.ndarray:
    out = np.empty(len(sentences), np.float64)
    for k, sentence in enumerate(sentences):
      state, total = self.lm.start(False), 0.0
      for w in sentence.split():
        i = self.words.get_index(w) if self.words.contains(w) else self.unk
        state, s = self.lm.score(state, i)
        total += s
      total += self.lm.finish(state)[1]
      out[k] = total * LN10
    return out


class CallableScorer:
  """A user's `module:function` (sentences in, natural-log probabilities out), checked on every call."""

  def __init__(self, spec: str):
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
      raise ValueError(f"config.decode.rescore.path={spec!r}: give the scorer as 'module:function'")
    try:
      self.fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
      raise ValueError(
        f"config.decode.rescore.path={spec!r}: cannot import {name} from {module} ({e}); the module must be "
        "importable (on PYTHONPATH)"
      ) from e
    self.spec = spec

  def __call__(self, sentences: Sequence[str]) -> np.ndarray:
    out = np.asarray(self.fn(list(sentences)), np.float64)
    if out.shape != (len(sentences),) or not np.all(np.isfinite(out) | (out == -np.inf)):
      raise ValueError(
        f"config.decode.rescore.path={self.spec!r} returned {out.shape} values for {len(sentences)} sentences "
        "(expected one finite natural-log probability, or -inf, per sentence)"
      )
    return out


def make_scorer(rescore_config, vocabulary: Iterable[str]) -> SentenceScorer | None:
  """The scorer `config.decode.rescore` names (None for kind 'none'); `vocabulary` is the first pass's words
  (every n-best word is one of them)."""
  rc = rescore_config
  if rc.kind == "none":
    return None
  if rc.kind == "ngram":
    return NgramScorer(rc.path, vocabulary)
  if rc.kind == "causal_lm":
    from b2t_jax.decoding import causal_lm  # imports transformers: only when asked for

    return causal_lm.CausalLMScorer(rc.path, batch_size=rc.batch_size)
  if rc.kind == "callable":
    return CallableScorer(rc.path)
  raise ValueError(f"config.decode.rescore.kind={rc.kind!r}: expected one of {', '.join(KINDS)}")


def first_pass_margin(nbest: Sequence[Hypothesis]) -> float:
  """Best minus second-best first-pass total; +inf for a list of one (nothing to choose between)."""
  return nbest[0].total - nbest[1].total if len(nbest) > 1 else math.inf


def is_gated_in(nbest: Sequence[Hypothesis], gate_margin: float) -> bool:
  """Whether a trial is rescored: every trial when `gate_margin` <= 0, else those whose margin is below it."""
  return bool(nbest) and (gate_margin <= 0 or first_pass_margin(nbest) < gate_margin)


@dataclasses.dataclass(frozen=True)
class Rescored:
  """One trial after the second pass: the chosen hypothesis' position in the n-best list, and (for a rescored
  trial) ln P of every hypothesis and its rescored total."""

  choice: int
  rescored: bool
  log_probs: tuple[float, ...] | None = None
  totals: tuple[float, ...] | None = None


def rerank(nbest: Sequence[Hypothesis], log_probs: Sequence[float], weight: float, word_bonus: float) -> Rescored:
  """The second-pass choice of one trial given ln P of each hypothesis (ties: the earlier, first-pass order)."""
  totals = tuple(h.total + weight * lp + word_bonus * len(h.words) for h, lp in zip(nbest, log_probs))
  return Rescored(int(np.argmax(totals)), True, tuple(float(x) for x in log_probs), totals)


def sentence_log_probs(nbests: Sequence[Sequence[Hypothesis]], scorer: SentenceScorer) -> dict[str, float]:
  """ln P of every distinct sentence of the given n-best lists, in one call of `scorer` (a causal LM batches)."""
  sentences = list(dict.fromkeys(h.text for nb in nbests for h in nb))
  return dict(zip(sentences, (float(x) for x in scorer(sentences)))) if sentences else {}


def choose(
  nbests: Sequence[Sequence[Hypothesis]],
  log_probs: dict[str, float],
  *,
  weight: float,
  word_bonus: float,
  gate_margin: float,
) -> list[Rescored]:
  """The second-pass choice of every trial given ln P of its sentences (`sentence_log_probs` of at least the
  gated trials); trials the gate leaves out keep their first-pass best."""
  return [
    rerank(nb, [log_probs[h.text] for h in nb], weight, word_bonus)
    if is_gated_in(nb, gate_margin)
    else Rescored(0, False)
    for nb in nbests
  ]


def rescore(
  nbests: Sequence[Sequence[Hypothesis]],
  scorer: SentenceScorer,
  *,
  weight: float,
  word_bonus: float,
  gate_margin: float,
) -> list[Rescored]:
  """The second pass over every trial's n-best list (see the module doc): only the gated trials' sentences are
  scored."""
  lp = sentence_log_probs([nb for nb in nbests if is_gated_in(nb, gate_margin)], scorer)
  return choose(nbests, lp, weight=weight, word_bonus=word_bonus, gate_margin=gate_margin)
