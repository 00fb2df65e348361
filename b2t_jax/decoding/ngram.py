"""Word n-gram language models: counting a text corpus and writing an interpolated modified Kneser-Ney ARPA file.

Estimation follows Chen & Goodman's interpolated modified Kneser-Ney as KenLM's `lmplz` does it:
- Each sentence is `<s> w1 .. wk </s>`; `<s>` is only ever a context (its unigram probability is 0, log10 -99).
- Adjusted counts `a`: the raw count at the highest order and for n-grams starting with `<s>` (nothing can
  extend them to the left); elsewhere the number of distinct words seen directly left of the n-gram.
- Three discounts per order from the count-of-counts t1..t4 of the adjusted counts:
  `Y = t1 / (t1 + 2 t2)`, `D1 = 1 - 2Y t2/t1`, `D2 = 2 - 3Y t3/t2`, `D3+ = 3 - 4Y t4/t3`.
  A corpus too small to have all four (or giving a discount outside (0, k]) uses the fallback discounts.
- `p(w | h) = (a(hw) - D(a(hw))) / Σ_v a(hv) + γ(h) p(w | h')` with `γ(h) = Σ_v D(a(hv)) / Σ_v a(hv)` and
  h' = h without its first word; the unigrams interpolate with the uniform distribution over the vocabulary
  without `<s>` (the words, `</s>` and `<unk>`), so `<unk>` gets exactly `γ() / |V|`.
- The ARPA file stores the interpolated probability of every seen n-gram and `γ(h)` as the backoff weight
  of every context h, which is what a back-off reader (KenLM) needs to reproduce the interpolated model.

The corpus is read line by line (streaming); the counts themselves are held in memory.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Iterator, Sequence

from absl import logging

from b2t_jax.data import t15

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
LOG10_ZERO = -99.0  # ARPA convention for probability 0 (the unigram <s>)
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # D1, D2, D3+ when the count-of-counts cannot give them (KenLM's fallback)

Ngram = tuple[str, ...]


def count_ngrams(sentences: Iterable[Sequence[str]], order: int) -> list[collections.Counter]:
  """Raw counts of every n-gram (n = 1..order) of `<s> words </s>`; index n-1 holds order n.

  The unigram `<s>` is not counted (it is never predicted). Empty sentences still add `<s> </s>`."""
  if order < 1:
    raise ValueError(f"order={order}: an n-gram model needs order >= 1")
  counts = [collections.Counter() for _ in range(order)]
  for words in sentences:
    tokens = (BOS, *words, EOS)
    for n in range(1, order + 1):
      c = counts[n - 1]
      for i in range(len(tokens) - n + 1):
        gram = tokens[i : i + n]
        if n == 1 and i == 0:
          continue
        c[gram] += 1
  return counts


def adjusted_counts(counts: list[collections.Counter]) -> list[dict[Ngram, int]]:
  """Kneser-Ney adjusted counts (see module doc) for every order."""
  order = len(counts)
  adjusted = [dict() for _ in range(order)]
  adjusted[-1] = dict(counts[-1])
  for n in range(order - 1, 0, -1):  # n = order of the lower level, 1-based
    left = collections.Counter(gram[1:] for gram in counts[n])  # distinct left extensions of each suffix
    adjusted[n - 1] = {g: (c if g[0] == BOS else left[g]) for g, c in counts[n - 1].items()}
  return adjusted


def discounts(
  adjusted: dict[Ngram, int], order: int, fallback: Sequence[float] = FALLBACK_DISCOUNTS
) -> tuple[float, float, float]:
  """(D1, D2, D3+) of one order from the count-of-counts of its adjusted counts; the fallback when the corpus
  is too small to estimate them (logged)."""
  t = collections.Counter(min(a, 4) for a in adjusted.values() if a <= 4)
  t1, t2, t3, t4 = (t[k] for k in (1, 2, 3, 4))
  if min(t1, t2, t3, t4) > 0:
    y = t1 / (t1 + 2 * t2)
    d = (1 - 2 * y * t2 / t1, 2 - 3 * y * t3 / t2, 3 - 4 * y * t4 / t3)
    if all(0 < dk <= k for k, dk in zip((1, 2, 3), d)):
      return d
  logging.warning(
    "order %d: count-of-counts t1..t4 = %s cannot give modified Kneser-Ney discounts (corpus too "
    "small); using the fallback discounts %s",
    order,
    (t1, t2, t3, t4),
    tuple(fallback),
  )
  return tuple(float(f) for f in fallback)


def _discount(d: Sequence[float], a: int) -> float:
  return d[min(a, 3) - 1]


def kneser_ney(
  counts: list[collections.Counter], fallback: Sequence[float] = FALLBACK_DISCOUNTS
) -> tuple[list[dict[Ngram, float]], list[dict[Ngram, float]], list[tuple[float, float, float]]]:
  """Interpolated modified Kneser-Ney estimates from raw counts.

  Returns (probs, backoffs, discounts): probs[n-1][gram] = p(last word | the rest) for every seen n-gram
  (plus `<unk>` and `<s>` at order 1), backoffs[n-1][context] = γ(context) for every n-gram that is a context,
  discounts[n-1] = (D1, D2, D3+) of order n."""
  order = len(counts)
  adjusted = adjusted_counts(counts)
  ds = [discounts(adjusted[n], n + 1, fallback) for n in range(order)]
  probs: list[dict[Ngram, float]] = [dict() for _ in range(order)]
  backoffs: list[dict[Ngram, float]] = [dict() for _ in range(order)]

  # Unigrams: interpolate with the uniform distribution over the vocabulary without <s>.
  d = ds[0]
  total = sum(adjusted[0].values())
  gamma = sum(_discount(d, a) for a in adjusted[0].values()) / total
  vocab_size = len(adjusted[0]) + (0 if (UNK,) in adjusted[0] else 1)
  uniform = 1.0 / vocab_size
  probs[0] = {g: (a - _discount(d, a)) / total + gamma * uniform for g, a in adjusted[0].items()}
  probs[0].setdefault((UNK,), gamma * uniform)
  probs[0][(BOS,)] = 0.0

  for n in range(1, order):
    d = ds[n]
    by_context: dict[Ngram, list[tuple[Ngram, int]]] = collections.defaultdict(list)
    for g, a in adjusted[n].items():
      by_context[g[:-1]].append((g, a))
    for h, grams in by_context.items():
      total = sum(a for _, a in grams)
      gamma = sum(_discount(d, a) for _, a in grams) / total
      backoffs[n - 1][h] = gamma
      for g, a in grams:
        probs[n][g] = (a - _discount(d, a)) / total + gamma * probs[n - 1][g[1:]]
  return probs, backoffs, ds


def _log10(p: float) -> float:
  return LOG10_ZERO if p <= 0.0 else math.log10(p)


def write_arpa(path: str, probs: list[dict[Ngram, float]], backoffs: list[dict[Ngram, float]]) -> None:
  """Writes the estimates as an ARPA file: log10 probability, the n-gram, and (below the highest order) the
  log10 backoff weight (0 for n-grams that are never a context)."""
  order = len(probs)
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n\\data\\\n")
    for n in range(order):
      f.write(f"ngram {n + 1}={len(probs[n])}\n")
    for n in range(order):
      f.write(f"\n\\{n + 1}-grams:\n")
      for gram in sorted(probs[n]):
        line = f"{_log10(probs[n][gram]):.7f}\t{' '.join(gram)}"
        if n < order - 1:
          bo = backoffs[n].get(gram)
          line += f"\t{_log10(bo) if bo else 0.0:.7f}"
        f.write(line + "\n")
    f.write("\n\\end\\\n")


def read_arpa(path: str) -> tuple[list[dict[Ngram, float]], list[dict[Ngram, float]]]:
  """Reads an ARPA file into (log10 probs, log10 backoffs) per order; an error names the line that is wrong."""
  probs: list[dict[Ngram, float]] = []
  backoffs: list[dict[Ngram, float]] = []
  section = 0
  with open(path, encoding="utf-8") as f:
    for lineno, raw in enumerate(f, 1):
      line = raw.strip()
      if not line or line.startswith("ngram ") or line == "\\data\\":
        continue
      if line == "\\end\\":
        break
      if line.endswith("-grams:"):
        section = int(line[1:].split("-")[0])
        while len(probs) < section:
          probs.append({})
          backoffs.append({})
        continue
      parts = line.split()
      if section == 0 or len(parts) < section + 1:
        raise ValueError(f"{path}:{lineno}: expected 'logprob w1..w{section} [backoff]', got {line!r}")
      gram = tuple(parts[1 : 1 + section])
      probs[section - 1][gram] = float(parts[0])
      if len(parts) > section + 1:
        backoffs[section - 1][gram] = float(parts[section + 1])
  return probs, backoffs


def arpa_vocabulary(path: str) -> list[str]:
  """The words of an ARPA file's unigram section without `<s>`, `</s>` and `<unk>`, most probable first (ties in
  file order); reads only that section."""
  words: list[tuple[float, str]] = []
  in_unigrams = False
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.strip()
      if line == "\\1-grams:":
        in_unigrams = True
        continue
      if in_unigrams:
        if not line:
          continue
        if line.startswith("\\"):
          break
        parts = line.split()
        if len(parts) < 2:
          raise ValueError(f"{path}:{lineno}: expected 'logprob word [backoff]', got {line!r}")
        if parts[1] not in (BOS, EOS, UNK):
          words.append((-float(parts[0]), parts[1]))
  if not in_unigrams:
    raise ValueError(f"{path}: no '\\1-grams:' section; is this an ARPA language model?")
  return [w for _, w in sorted(words, key=lambda x: x[0])]


def dataset_sentences(data_dir: str, split: str = "train") -> Iterator[str]:
  """The `sentence_label` of every trial of one split under a t15 tree (SPEC §1), session folders in sorted
  order; reads only the attributes, never the neural features. A prepared TFDS dataset (tools/prepare_data.py)
  is read record by record instead (the records hold the features, so this reads them too)."""
  from b2t_jax.data import pipeline, prepare  # imports TFDS: only when sentences are asked for

  dataset_dir = prepare.find_dataset_dir(data_dir)
  if dataset_dir is not None:
    yield from pipeline.split_sentences(dataset_dir, split)
    return
  hint = "pass the hdf5_data_final folder (or --corpus=FILE with one sentence per line)"
  for _, path, name, g in t15.split_trial_groups(data_dir, split, hint=hint):
    if "sentence_label" not in g.attrs:
      raise ValueError(
        f"{path}: {name}: attribute 'sentence_label' missing; the {split} split has no sentences (the test "
        "split is unlabelled)"
      )
    yield t15.decode_str(g.attrs["sentence_label"])
