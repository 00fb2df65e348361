"""Builds a word n-gram language model (interpolated modified Kneser-Ney) as an ARPA file.

python tools/build_lm.py --corpus=FILE --order=N --out=lm.arpa
python tools/build_lm.py --data_dir=.../hdf5_data_final --order=3 --out=lm.arpa   # the training sentences

The corpus holds one sentence per line; each is normalised as WER normalises (lowercase; letters, apostrophes
and hyphens), so the LM's words match the decoder's lexicon. Without --corpus the training sentences of the
t15 tree under --data_dir are used. The file is read line by line with a progress bar; see
b2t_jax/decoding/ngram.py for the estimator.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

from absl import app, flags
from tqdm import tqdm

from b2t_jax.decoding import ngram
from b2t_jax.metrics import sentence_words

_CORPUS = flags.DEFINE_string(
  "corpus", "", "text file, one sentence per line; empty = the training sentences of --data_dir"
)
_DATA_DIR = flags.DEFINE_string(
  "data_dir", "", "t15 hdf5_data_final-style folder whose train split is the default corpus"
)
_ORDER = flags.DEFINE_integer("order", 3, "n-gram order (>= 2: KenLM loads no unigram-only model)")
_OUT = flags.DEFINE_string("out", None, "output ARPA path", required=True)
_FALLBACK = flags.DEFINE_list(
  "discount_fallback",
  [str(d) for d in ngram.FALLBACK_DISCOUNTS],
  "D1,D2,D3+ used for an order whose count-of-counts cannot give the discounts",
)


def _file_lines(path: str) -> Iterator[str]:
  """Lines of a text file, with a progress bar in bytes."""
  with (
    open(path, encoding="utf-8") as f,
    tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, desc=os.path.basename(path)) as bar,
  ):
    for line in f:
      bar.update(len(line.encode("utf-8")))
      yield line


def _tokenised(lines: Iterable[str], skipped: list[int]) -> Iterator[list[str]]:
  for line in lines:
    words = sentence_words(line)
    if words:
      yield words
    else:
      skipped[0] += 1


def build_lm(lines: Iterable[str], order: int, out: str, fallback=ngram.FALLBACK_DISCOUNTS) -> dict:
  """Counts `lines`, estimates the model and writes `out`; returns {'sentences', 'skipped', 'ngrams',
  'discounts'}."""
  skipped = [0]
  n_sentences = [0]

  def counted(it):
    for words in it:
      n_sentences[0] += 1
      yield words

  counts = ngram.count_ngrams(counted(_tokenised(lines, skipped)), order)
  if not n_sentences[0]:
    raise ValueError("the corpus has no sentence with a word in it; check --corpus / --data_dir")
  probs, backoffs, ds = ngram.kneser_ney(counts, fallback)
  ngram.write_arpa(out, probs, backoffs)
  return {"sentences": n_sentences[0], "skipped": skipped[0], "ngrams": [len(p) for p in probs], "discounts": ds}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _ORDER.value < 2:
    raise app.UsageError(f"--order={_ORDER.value}: KenLM, which the decoder loads the LM with, needs order >= 2")
  if _CORPUS.value:
    lines = _file_lines(_CORPUS.value)
  elif _DATA_DIR.value:
    lines = tqdm(ngram.dataset_sentences(_DATA_DIR.value, "train"), unit=" sentences", desc="train sentences")
  else:
    raise app.UsageError("give --corpus=FILE (one sentence per line) or --data_dir=T15_FOLDER (its train sentences)")
  info = build_lm(lines, _ORDER.value, _OUT.value, tuple(float(x) for x in _FALLBACK.value))
  print(
    f"wrote {_OUT.value}: order {_ORDER.value}, {info['sentences']} sentences "
    f"({info['skipped']} empty lines skipped), n-grams per order {info['ngrams']}, discounts "
    + ", ".join(f"{n + 1}: " + "/".join(f"{d:.3f}" for d in ds) for n, ds in enumerate(info["discounts"]))
  )


if __name__ == "__main__":
  app.run(main)
