"""The first pass of word decoding: a lexicon-constrained CTC beam search with a word n-gram LM (flashlight-text
`LexiconDecoder`), returning the n best distinct word sequences with their scores.

The lexicon (decoding/lexicon.py) spells each word with SPEC §2 phoneme ids followed by the word-boundary token
` | ` (id 40), as the training labels put one after every word. The search therefore emits a word when it
consumes that boundary; extra boundary frames between words are silence (scored `sil_score` each), blanks may
appear anywhere (CTC).

LM scores come from KenLM (log10, ARPA or binary) weighted by `lm_weight`; without an LM path the decoder
runs a lexicon-only ("greedy-lexicon") beam search whose words are scored by the emissions and `word_score`
alone (a zero LM, with exact ties such as homophones going to the word listed first in the lexicon).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import os

import numpy as np
from absl import logging

from b2t_jax.decoding.lexicon import UNK_WORD, Lexicon, phoneme_names
from b2t_jax.vocab import BLANK_ID, PHONEMES, SIL_ID

TRIE_MAX_LABELS = 6  # flashlight-text's kTrieMaxLabel: words one trie node (one spelling) can hold


@dataclasses.dataclass(frozen=True)
class Hypothesis:
  """One entry of a trial's n-best list: its words and first-pass scores. `acoustic` is the summed CTC
  log-probability of its path (blank penalty included), `lm` the first-pass LM's log10 probability of the words
  (unweighted; ≈0 without an LM), `total` the beam's score: acoustic + lm_weight·lm + word_score·#words +
  sil_score·#silence frames."""

  words: tuple[str, ...]
  acoustic: float
  lm: float
  total: float

  @property
  def text(self) -> str:
    return " ".join(self.words)

  def as_dict(self) -> dict:
    return {"words": self.text, "acoustic": self.acoustic, "lm": self.lm, "total": self.total}


def _tie_break_lm(n_words: int):
  """The LM of lexicon-only decoding: flashlight's zero LM (one state per word history, so hypotheses merge only
  when their words agree and the n-best list holds distinct sentences), except that word i scores -i·ε
  (ε = 1e-3 / n_words, far below any acoustic difference). Homophones score exactly alike and flashlight breaks
  exact ties by pointer order, i.e. differently from run to run; this makes the earlier word of the lexicon
  order win, every time."""
  from flashlight.lib.text import decoder as fl

  class TieBreakLM(fl.LM):
    def __init__(self):
      fl.LM.__init__(self)
      self.eps = 1e-3 / max(n_words, 1)

    def start(self, start_with_nothing):
      return fl.LMState()  # a fresh root per trial: the history trie of one search is freed with it

    def score(self, state, word):
      return state.child(word), -self.eps * word

    def finish(self, state):
      return state, 0.0

  return TieBreakLM()


class LexiconLMDecoder:
  """Beam search over a phoneme trie of the lexicon, with an optional KenLM word LM.

  `decode(log_probs)` takes one trial's (T, 41) frame scores (logits or log-probabilities: a log-softmax is
  applied) and returns the best word sequence as a string. Not thread-safe (flashlight keeps search state)."""

  def __init__(
    self,
    lexicon: Lexicon,
    *,
    lm_path: str = "",
    beam_size: int = 100,
    beam_size_token: int = 41,
    beam_threshold: float = 25.0,
    lm_weight: float = 2.0,
    word_score: float = 0.0,
    sil_score: float = 0.0,
    unk_score: float = float("-inf"),
    log_add: bool = False,
    blank_penalty: float = 0.0,
    blank_id: int = BLANK_ID,
    sil_id: int = SIL_ID,
  ):
    from flashlight.lib.text import decoder as fl
    from flashlight.lib.text.dictionary import Dictionary

    self.lexicon = lexicon
    self.blank_id, self.sil_id, self.blank_penalty = blank_id, sil_id, blank_penalty
    self.word_dict = Dictionary()
    for w in lexicon.words:
      self.word_dict.add_entry(w)
    self.word_dict.add_entry(UNK_WORD)
    self.unk_index = self.word_dict.get_index(UNK_WORD)
    self.has_lm = bool(lm_path)
    if lm_path:
      from flashlight.lib.text.decoder.kenlm import KenLM

      if not os.path.exists(lm_path):
        raise FileNotFoundError(
          f"config.decode.lm_path={lm_path!r} does not exist; build one with "
          "tools/build_lm.py or leave it empty for lexicon-only decoding"
        )
      self.lm = KenLM(lm_path, self.word_dict)
    else:
      self.lm = _tie_break_lm(len(lexicon.words) + 1)
      lm_weight = 1.0
    # Trie over phoneme ids; each leaf's score is the word's LM score after <s>, smeared (max) towards the
    # root so partial words carry a look-ahead LM estimate. flashlight keeps at most TRIE_MAX_LABELS words per
    # spelling (and drops the rest with only a stderr line): keep the LM's favourites (ties: lexicon order)
    # and report the others.
    start = self.lm.start(False)
    by_spelling: dict[tuple[int, ...], list[tuple[float, int]]] = collections.defaultdict(list)
    for i, w in enumerate(lexicon.words):
      score = self.lm.score(start, i)[1]
      for pron in lexicon.pronunciations[w]:
        by_spelling[tuple(pron) + (sil_id,)].append((score, i))
    self.trie = fl.Trie(len(PHONEMES), sil_id)
    kept, dropped, n_over = set(), {}, 0
    for spelling, entries in by_spelling.items():
      n_over += len(entries) > TRIE_MAX_LABELS
      entries.sort(key=lambda e: (-e[0], e[1]))
      for score, i in entries[:TRIE_MAX_LABELS]:
        self.trie.insert(list(spelling), i, score)
        kept.add(i)
      for _, i in entries[TRIE_MAX_LABELS:]:
        dropped[lexicon.words[i]] = phoneme_names(spelling[:-1])
    self.undecodable = sorted(lexicon.words[i] for i in set(range(len(lexicon.words))) - kept)
    if dropped:
      logging.warning(
        "%d spellings have more homophones than the %d words per spelling the decoder's trie holds: "
        "%d words lose that spelling (e.g. %s), %d of them cannot be decoded at all (%s%s)",
        n_over,
        TRIE_MAX_LABELS,
        len(dropped),
        ", ".join(f"{w} [{p}]" for w, p in list(dropped.items())[:5]),
        len(self.undecodable),
        ", ".join(self.undecodable[:10]),
        " ..." if len(self.undecodable) > 10 else "",
      )
    self.trie.smear(fl.SmearingMode.MAX)
    self.options = fl.LexiconDecoderOptions(
      beam_size=beam_size,
      beam_size_token=beam_size_token,
      beam_threshold=beam_threshold,
      lm_weight=lm_weight,
      word_score=word_score,
      unk_score=unk_score,
      sil_score=sil_score,
      log_add=log_add,
      criterion_type=fl.CriterionType.CTC,
    )
    self.decoder = self._search(self.options)

  def _search(self, options):
    from flashlight.lib.text import decoder as fl

    return fl.LexiconDecoder(options, self.trie, self.lm, self.sil_id, self.blank_id, self.unk_index, [], False)

  def retuned(self, *, lm_weight: float, word_score: float, blank_penalty: float) -> LexiconLMDecoder:
    """The same lexicon, trie and loaded LM with other weights (tools/tune_decode.py: no LM reload per point);
    `lm_weight` is ignored without an LM, as in the constructor."""
    from flashlight.lib.text import decoder as fl

    o = self.options
    out = copy.copy(self)
    out.blank_penalty = blank_penalty
    out.options = fl.LexiconDecoderOptions(
      beam_size=o.beam_size,
      beam_size_token=o.beam_size_token,
      beam_threshold=o.beam_threshold,
      lm_weight=lm_weight if self.has_lm else o.lm_weight,
      word_score=word_score,
      unk_score=o.unk_score,
      sil_score=o.sil_score,
      log_add=o.log_add,
      criterion_type=o.criterion_type,
    )
    out.decoder = out._search(out.options)
    return out

  @classmethod
  def from_config(cls, lexicon: Lexicon, decode_config, *, use_lm: bool) -> LexiconLMDecoder:
    """A decoder with every option from `config.decode`; `use_lm=False` ignores `lm_path` and uses
    `word_score_no_lm` (lexicon only)."""
    d = decode_config
    return cls(
      lexicon,
      lm_path=d.lm_path if use_lm else "",
      beam_size=d.beam_size,
      beam_size_token=d.beam_size_token,
      beam_threshold=d.beam_threshold,
      lm_weight=d.lm_weight,
      word_score=d.word_score if use_lm else d.word_score_no_lm,
      sil_score=d.sil_score,
      unk_score=d.unk_score,
      log_add=d.log_add,
      blank_penalty=d.blank_penalty,
    )

  def emissions(self, scores: np.ndarray) -> np.ndarray:
    """log-softmax over classes, then the blank penalty (subtracted from the blank's log-probability)."""
    x = np.asarray(scores, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    x = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    x[:, self.blank_id] -= self.blank_penalty
    return np.ascontiguousarray(x, np.float32)

  def decode_nbest(self, scores: np.ndarray, n: int = 1) -> list[Hypothesis]:
    """The `n` best distinct word sequences of one trial's (T, n_classes) scores, best first.

    flashlight returns every hypothesis of the final beam sorted by score; two of them can carry the same words
    (when none ends on a word boundary, or with the same words at different points of the trie): only the
    first, best-scoring one of each word sequence is kept, so the list may hold fewer than `n`."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(PHONEMES):
      raise ValueError(f"expected (T, {len(PHONEMES)}) frame scores, got shape {scores.shape}")
    if scores.shape[0] == 0:
      return [Hypothesis((), 0.0, 0.0, 0.0)]
    em = self.emissions(scores)
    out: dict[tuple[str, ...], Hypothesis] = {}
    results = self.decoder.decode(em.ctypes.data, em.shape[0], em.shape[1])
    for r in sorted(results, key=lambda r: -r.score):  # sorted already; stable, so kept in flashlight's order
      words = tuple(self.word_dict.get_entry(i) for i in r.words if i >= 0)
      if words not in out:
        out[words] = Hypothesis(words, float(r.emittingModelScore), float(r.lmScore), float(r.score))
        if len(out) == n:
          break
    return list(out.values())

  def decode_words(self, scores: np.ndarray) -> list[str]:
    """The best word sequence for one trial's (T, n_classes) scores."""
    best = self.decode_nbest(scores, 1)
    return list(best[0].words) if best else []

  def decode(self, scores: np.ndarray) -> str:
    """The best word sequence for one trial's (T, n_classes) scores, space-separated."""
    return " ".join(self.decode_words(scores))
