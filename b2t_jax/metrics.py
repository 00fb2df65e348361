"""Greedy CTC decoding, edit distance, phoneme and word error rates (aggregate and per day), on the host."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from b2t_jax.vocab import BLANK_ID


def greedy_decode(frame_ids: np.ndarray, length: int) -> list[int]:
  """Best path: argmax ids of the first `length` frames -> collapse repeats -> drop blanks."""
  ids = np.asarray(frame_ids[:length])
  if ids.size == 0:
    return []
  keep = np.ones(ids.shape, bool)
  keep[1:] = ids[1:] != ids[:-1]
  ids = ids[keep]
  return [int(i) for i in ids if i != BLANK_ID]


def edit_distance(a: Sequence, b: Sequence) -> int:
  """Levenshtein distance (unit costs) between two sequences."""
  if len(a) < len(b):
    a, b = b, a
  prev = np.arange(len(b) + 1)
  for i, x in enumerate(a, 1):
    cur = np.empty_like(prev)
    cur[0] = i
    for j, y in enumerate(b, 1):
      cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
    prev = cur
  return int(prev[-1])


class ErrorRate:
  """Accumulates Σ edit distance / Σ reference length, overall and per day."""

  def __init__(self):
    self.errors: dict[int, int] = {}
    self.lengths: dict[int, int] = {}

  def add(self, day: int, hyp: Sequence, ref: Sequence) -> None:
    self.errors[day] = self.errors.get(day, 0) + edit_distance(hyp, ref)
    self.lengths[day] = self.lengths.get(day, 0) + len(ref)

  def rate(self) -> float:
    return sum(self.errors.values()) / max(sum(self.lengths.values()), 1)

  def per_day(self) -> dict[int, float]:
    return {d: self.errors[d] / max(self.lengths[d], 1) for d in sorted(self.errors)}


def normalize_sentence(sentence: str) -> str:
  """WER normalisation (SPEC §5, as the reference's `remove_punctuation`): keep letters, apostrophes, hyphens
  and spaces; a hyphen ending a word and a double hyphen are dropped, " '" joins its word; lowercase; single
  spaces."""
  s = re.sub(r"[^a-zA-Z\- ']", "", sentence)
  s = s.replace("- ", " ").replace("--", "").replace(" '", "'").lower()
  return " ".join(s.split())


def sentence_words(sentence: str) -> list[str]:
  """The words WER counts: the normalised sentence split on spaces."""
  return normalize_sentence(sentence).split()
