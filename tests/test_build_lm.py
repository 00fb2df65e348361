"""tools/build_lm.py and b2t_jax/decoding/ngram.py: modified Kneser-Ney probabilities against hand computation,
and the ARPA file as KenLM (inside flashlight-text) reads it."""

import math
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from b2t_jax.decoding import lexicon, ngram

CORPUS = ["A b.", "a B", "", "b"]  # normalised to: a b / a b / b (the empty line is skipped)


def _build(tmp_path, order, lines=CORPUS, extra=()):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text("\n".join(lines) + "\n")
  out = tmp_path / f"lm{order}.arpa"
  p = subprocess.run(
    [sys.executable, "tools/build_lm.py", f"--corpus={corpus}", f"--order={order}", f"--out={out}", *extra],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": ROOT},
  )
  assert p.returncode == 0, p.stderr[-2000:]
  assert "3 sentences (1 empty lines skipped)" in p.stdout
  return str(out)


# Hand computation for the corpus <s> a b </s> (twice), <s> b </s>. Every order is too small for the
# count-of-counts estimate, so the fallback discounts D1 = 0.5, D2 = 1, D3+ = 1.5 apply.
# Unigram adjusted counts = distinct left neighbours: a {<s>} = 1, b {<s>, a} = 2, </s> {b} = 1; total 4.
# γ() = (0.5 + 1 + 0.5) / 4 = 0.5; uniform over {a, b, </s>, <unk>} = 1/4.
P_A, P_B, P_EOS, P_UNK = 0.5 / 4 + 0.125, 1 / 4 + 0.125, 0.5 / 4 + 0.125, 0.125  # .25 .375 .25 .125


def test_bigram_probabilities_match_hand_computation(tmp_path):
  probs, backoffs = ngram.read_arpa(_build(tmp_path, 2))
  assert probs[0] == pytest.approx(
    {
      ("a",): math.log10(P_A),
      ("b",): math.log10(P_B),
      ("</s>",): math.log10(P_EOS),
      ("<unk>",): math.log10(P_UNK),
      ("<s>",): -99.0,
    },
    abs=1e-6,
  )
  # Highest order: raw counts. Context <s>: a 2, b 1 (total 3): γ = (1 + 0.5) / 3 = 0.5.
  # Context a: b 2 -> γ = 1/2; context b: </s> 3 -> γ = 1.5/3.
  expect = {
    ("<s>", "a"): (2 - 1) / 3 + 0.5 * P_A,
    ("<s>", "b"): (1 - 0.5) / 3 + 0.5 * P_B,
    ("a", "b"): (2 - 1) / 2 + 0.5 * P_B,
    ("b", "</s>"): (3 - 1.5) / 3 + 0.5 * P_EOS,
  }
  assert probs[1] == pytest.approx({g: math.log10(p) for g, p in expect.items()}, abs=1e-6)
  assert backoffs[0] == pytest.approx(
    {("<s>",): math.log10(0.5), ("a",): math.log10(0.5), ("b",): math.log10(0.5), ("</s>",): 0.0, ("<unk>",): 0.0},
    abs=1e-6,
  )


def test_trigram_uses_raw_counts_for_ngrams_starting_with_bos(tmp_path):
  probs, backoffs = ngram.read_arpa(_build(tmp_path, 3))
  # Bigram adjusted counts: <s> a = 2 and <s> b = 1 (raw: nothing extends <s> to the left); a b = 1
  # (left neighbours {<s>}), b </s> = 2 ({a, <s>}).
  p_a_bos, p_b_bos = (2 - 1) / 3 + 0.5 * P_A, (1 - 0.5) / 3 + 0.5 * P_B
  p_b_a = (1 - 0.5) / 1 + 0.5 * P_B
  p_eos_b = (2 - 1) / 2 + 0.5 * P_EOS
  assert probs[1] == pytest.approx(
    {
      ("<s>", "a"): math.log10(p_a_bos),
      ("<s>", "b"): math.log10(p_b_bos),
      ("a", "b"): math.log10(p_b_a),
      ("b", "</s>"): math.log10(p_eos_b),
    },
    abs=1e-6,
  )
  # Trigrams (raw counts): <s> a b 2, a b </s> 2, <s> b </s> 1; each context has one continuation.
  expect = {
    ("<s>", "a", "b"): (2 - 1) / 2 + 0.5 * p_b_a,
    ("a", "b", "</s>"): (2 - 1) / 2 + 0.5 * p_eos_b,
    ("<s>", "b", "</s>"): (1 - 0.5) / 1 + 0.5 * p_eos_b,
  }
  assert probs[2] == pytest.approx({g: math.log10(p) for g, p in expect.items()}, abs=1e-6)
  assert backoffs[1][("<s>", "a")] == pytest.approx(math.log10(0.5), abs=1e-6)


def test_kenlm_reads_the_file_and_scores_as_computed_by_hand(tmp_path):
  from flashlight.lib.text.decoder.kenlm import KenLM
  from flashlight.lib.text.dictionary import Dictionary

  words = Dictionary()
  for w in ("a", "b", "zzz"):
    words.add_entry(w)
  lm = KenLM(_build(tmp_path, 3), words)
  state, s1 = lm.score(lm.start(False), 0)  # a | <s>
  state, s2 = lm.score(state, 1)  # b | <s> a
  _, s3 = lm.finish(state)  # </s> | a b
  p_b_a = 0.5 + 0.5 * P_B
  p_eos_b = 0.5 + 0.5 * P_EOS
  assert [s1, s2, s3] == pytest.approx(
    [math.log10(1 / 3 + 0.5 * P_A), math.log10(0.5 + 0.5 * p_b_a), math.log10(0.5 + 0.5 * p_eos_b)], abs=1e-5
  )
  # Unseen continuations back off: p(a | <s> a) = γ(<s> a) γ(a) p(a) = 0.5 · 0.5 · P_A.
  _, s4 = lm.score(lm.score(lm.start(False), 0)[0], 0)
  assert s4 == pytest.approx(math.log10(0.25 * P_A), abs=1e-5)
  # A word outside the LM is <unk>: p(<unk> | <s>) = γ(<s>) p(<unk>).
  assert lm.score(lm.start(False), 2)[1] == pytest.approx(math.log10(0.5 * P_UNK), abs=1e-5)


def test_distributions_sum_to_one_on_a_larger_corpus(tmp_path):
  """Every context's interpolated distribution over the vocabulary (without <s>) sums to 1."""
  import random

  rng = random.Random(0)
  vocab = [f"w{i}" for i in range(12)]
  lines = [" ".join(rng.choice(vocab[: rng.randint(3, 12)]) for _ in range(rng.randint(1, 7))) for _ in range(300)]
  probs, backoffs = ngram.read_arpa(_build_any(tmp_path, lines, 3))
  targets = [g[0] for g in probs[0] if g != ("<s>",)]

  def logp(h, w):
    g = tuple(h) + (w,)
    if g in probs[len(g) - 1]:
      return probs[len(g) - 1][g]
    return backoffs[len(h) - 1].get(tuple(h), 0.0) + logp(h[1:], w)

  for h in [(), ("<s>",), ("w1",), ("<s>", "w0"), ("w2", "w3"), ("w11", "w5")]:
    assert sum(10 ** logp(h, w) for w in targets) == pytest.approx(1.0, abs=1e-5), h


def _build_any(tmp_path, lines, order):
  corpus = tmp_path / "big.txt"
  corpus.write_text("\n".join(lines) + "\n")
  counts = ngram.count_ngrams((line.split() for line in lines), order)
  probs, backoffs, ds = ngram.kneser_ney(counts)
  assert all(d != ngram.FALLBACK_DISCOUNTS for d in ds[1:])  # enough data: estimated discounts
  out = str(tmp_path / "big.arpa")
  ngram.write_arpa(out, probs, backoffs)
  return out


def test_discounts_from_count_of_counts():
  # t1..t4 = 4, 2, 1, 1: Y = 4 / (4 + 4) = 0.5; D1 = 1 - 2·0.5·2/4 = 0.5; D2 = 2 - 3·0.5·1/2 = 1.25;
  # D3+ = 3 - 4·0.5·1/1 = 1.0 (counts above 4 do not enter).
  adjusted = {("a",): 1, ("b",): 1, ("c",): 1, ("d",): 1, ("e",): 2, ("f",): 2, ("g",): 3, ("h",): 4, ("i",): 9}
  assert ngram.discounts(adjusted, 1) == pytest.approx((0.5, 1.25, 1.0))
  assert ngram.discounts({("a",): 1}, 1) == ngram.FALLBACK_DISCOUNTS


def test_default_corpus_is_the_training_sentences(tmp_path, synthetic_dir):
  out = tmp_path / "train.arpa"
  p = subprocess.run(
    [sys.executable, "tools/build_lm.py", f"--data_dir={synthetic_dir}", "--order=2", f"--out={out}"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": ROOT},
  )
  assert p.returncode == 0, p.stderr[-2000:]
  sentences = list(ngram.dataset_sentences(synthetic_dir, "train"))
  assert len(sentences) == 3 * 16 and f"{len(sentences)} sentences" in p.stdout
  words = {w for s in sentences for w in s.split()}
  assert set(ngram.arpa_vocabulary(str(out))) == words


def test_the_label_readers_name_a_wrong_folder_and_the_unlabelled_split(tmp_path, synthetic_dir):
  """ngram.dataset_sentences and lexicon.dataset_transcripts (both on t15.split_trial_groups): a missing folder,
  a folder without the split's files and the test split (no labels in t15) each raise naming the path (and the
  trial); the labelled splits come in session, then trial order, the same trials for both readers."""
  missing = str(tmp_path / "absent")
  empty = tmp_path / "empty"
  empty.mkdir()
  for read, unlabelled in ((ngram.dataset_sentences, "unlabelled"), (lexicon.dataset_transcripts, "labelled splits")):
    with pytest.raises(FileNotFoundError, match=re.escape(f"data_dir {missing!r} does not exist")):
      next(read(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{empty}: no */data_train.hdf5 files")):
      next(read(str(empty)))
    with pytest.raises(ValueError, match=rf"/t15\.[0-9.]+/data_test\.hdf5: trial_0000: .*{unlabelled}"):
      next(read(synthetic_dir, "test"))
  transcripts = list(lexicon.dataset_transcripts(synthetic_dir, "val"))
  ids = [t for t, _, _ in transcripts]
  assert len(ids) == len(set(ids)) > 3 and ids == sorted(ids)
  assert all(re.fullmatch(r"t15\.[0-9.]+/trial_[0-9]{4}", t) for t in ids)
  assert list(ngram.dataset_sentences(synthetic_dir, "val")) == [s for _, s, _ in transcripts]
