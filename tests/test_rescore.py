"""The second pass (b2t_jax/decoding/rescore.py, causal_lm.py): n-best rescoring with an n-gram LM, a user callable and
a causal LM built in the test; the gate; and tools/decodelib.py and tools/benchmark_decode.py on the same lists."""

import math
import os
import sys

import numpy as np
import pytest
from conftest import ROOT
from test_decoding import _lm, arpa_log10, emissions

from b2t_jax.decoding import beam_search, lexicon, rescore

WORDS = ["i", "red", "read", "a", "book", "car"]
PRON = {"i": "AY", "red": "R EH D", "read": "R EH D", "a": "AH", "book": "B UH K", "car": "K AA R"}


@pytest.fixture(scope="module")
def lms(tmp_path_factory):
  """A weak first-pass LM that has never seen 'i read' (so it backs off to 'red', the word seen in more contexts) and a
  stronger one built from the task's sentences."""
  tmp = tmp_path_factory.mktemp("lms")
  weak = _lm(tmp, "weak", ["a red car", "book red", "car red", "i", "read", "a book"])
  strong = _lm(tmp, "strong", ["i read a book"] * 9 + ["a red car"], order=3)
  return weak, strong


@pytest.fixture(scope="module")
def trials(lms):
  """Two trials' n-best lists from the weak first pass: 'i read a book' (homophones: a close call) and
  'a red car' (a clear one)."""
  weak, _ = lms
  dec = beam_search.LexiconLMDecoder(lexicon.build_lexicon(WORDS), lm_path=weak, lm_weight=1.0)
  rng = np.random.default_rng(7)
  x = [emissions(s.split(), PRON, rng, noise=0.5) for s in ("i read a book", "a red car")]
  return dec, [dec.decode_nbest(lg, 5) for lg in x]


def test_a_stronger_ngram_lm_fixes_a_first_pass_error(lms, trials):
  _, strong = lms
  _, (nb, _) = trials
  assert nb[0].text == "i red a book" and nb[1].text == "i read a book"  # the weak LM's error
  scorer = rescore.NgramScorer(strong, WORDS)
  lp = scorer([h.text for h in nb])
  # ln P by the ARPA back-off rule, read independently of KenLM
  assert lp == pytest.approx([math.log(10) * arpa_log10(strong, h.words) for h in nb], abs=1e-4)
  [r] = rescore.rescore([nb], scorer, weight=1.0, word_bonus=0.0, gate_margin=0.0)
  assert r.rescored and nb[r.choice].text == "i read a book"
  assert r.totals == pytest.approx([h.total + p for h, p in zip(nb, lp)])
  # the word bonus counts words: a large one picks the longest hypothesis
  [r] = rescore.rescore([nb], scorer, weight=1.0, word_bonus=1e3, gate_margin=0.0)
  assert len(nb[r.choice].words) == max(len(h.words) for h in nb) > len(nb[0].words)


def _module(tmp_path, monkeypatch, source):
  (tmp_path / "user_scorer.py").write_text(source)
  monkeypatch.syspath_prepend(str(tmp_path))
  sys.modules.pop("user_scorer", None)


def test_the_gate_rescores_only_unsure_trials(trials, tmp_path, monkeypatch):
  """A callable that loves every second hypothesis: with gate_margin between the two trials' margins only the
  close call is rescored (and flips); the clear trial keeps its first pass; gate 0 rescores both."""
  _, nbests = trials
  margins = [rescore.first_pass_margin(nb) for nb in nbests]
  assert margins == [nb[0].total - nb[1].total for nb in nbests] and margins[0] < margins[1]
  seconds = {nb[1].text for nb in nbests}
  _module(
    tmp_path, monkeypatch, f"def score(sentences):\n  return [0.0 if s in {seconds!r} else -1e3 for s in sentences]\n"
  )
  scorer = rescore.make_scorer(_rescore_config("callable", "user_scorer:score"), WORDS)
  gated = rescore.rescore(nbests, scorer, weight=1.0, word_bonus=0.0, gate_margin=(margins[0] + margins[1]) / 2)
  assert [(r.rescored, r.choice) for r in gated] == [(True, 1), (False, 0)]
  assert [
    (r.rescored, r.choice) for r in rescore.rescore(nbests, scorer, weight=1.0, word_bonus=0.0, gate_margin=0.0)
  ] == [
    (True, 1),
    (True, 1),
  ]
  assert rescore.first_pass_margin(nbests[0][:1]) == math.inf and not rescore.is_gated_in(nbests[0][:1], 1.0)
  _module(tmp_path, monkeypatch, "def score(sentences):\n  return [0.0]\n")
  with pytest.raises(ValueError, match="returned \\(1,\\) values for 5 sentences"):
    rescore.make_scorer(_rescore_config("callable", "user_scorer:score"), WORDS)([h.text for h in nbests[0]])
  with pytest.raises(ValueError, match="cannot import nothing from user_scorer"):
    rescore.CallableScorer("user_scorer:nothing")


def _rescore_config(kind, path, batch_size=2):
  import ml_collections

  return ml_collections.ConfigDict({"kind": kind, "path": path, "batch_size": batch_size})


def test_causal_lm_scores_sentences_as_a_direct_forward_pass(tmp_path, trials, monkeypatch):
  """A tiny random GPT-2 saved and loaded from a directory: the scorer's batched, padded, bucketed ln P equals
  one unpadded forward pass per sentence with the log-softmax taken in NumPy, and rescoring picks the best
  total + ln P."""
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import decodelib
  import jax
  from transformers import FlaxAutoModelForCausalLM

  model_dir = str(tmp_path / "tiny_gpt2")
  monkeypatch.setenv("USE_TORCH", "0")  # as CausalLMScorer does for Flax weights: the torch import costs 3-30 s
  decodelib.write_random_causal_lm(model_dir, WORDS, n_layer=2, n_embd=32)
  scorer = rescore.make_scorer(_rescore_config("causal_lm", model_dir, batch_size=2), WORDS)
  sentences = ["i read a book", "a", "a red car i read", "book"]  # 3 and 1 rows: padded rows too
  got = scorer(sentences)
  model, params = FlaxAutoModelForCausalLM.from_pretrained(model_dir, _do_init=False)
  forward = jax.jit(lambda p, ids: model(ids, params=p).logits)  # one unpadded sequence at a time
  for s, value in zip(sentences, got):
    ids = scorer.token_ids(s)
    assert (
      ids[0] == scorer.tokenizer.bos_token_id
      and ids[-1] == scorer.tokenizer.eos_token_id
      and len(ids) == len(s.split()) + 2
    )
    logits = np.asarray(forward(params, np.asarray([ids]))[0], np.float64)
    logp = (
      logits
      - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - logits.max(-1, keepdims=True)
    )
    assert value == pytest.approx(sum(logp[t - 1, ids[t]] for t in range(1, len(ids))), abs=1e-4)
  _, (nb, _) = trials
  [r] = rescore.rescore([nb], scorer, weight=2.0, word_bonus=0.0, gate_margin=0.0)
  lp = scorer([h.text for h in nb])
  assert r.choice == int(np.argmax([h.total + 2.0 * p for h, p in zip(nb, lp)]))


def test_tune_decode_measures_each_point_as_a_fresh_decoder_would(lms, trials):
  """tools/decodelib.py's search: each first-pass point's WER equals that of a decoder built with those weights,
  each rescoring point's that of rescore.rescore; the strong LM's rescoring beats the weak first pass."""
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import decodelib

  weak, strong = lms
  dec, _ = trials
  rng = np.random.default_rng(11)
  refs = [s.split() for s in ("i read a book", "a red car", "i read a book", "a book")]
  logits = [emissions(r, PRON, rng, noise=0.5) for r in refs]
  grid = {
    "lm_weight": [0.5, 2.0],
    "word_score": [0.0],
    "blank_penalty": [0.0, 1.0],
    "rescore_weight": [1.0],
    "rescore_word_bonus": [0.0],
  }
  scorer = rescore.NgramScorer(strong, WORDS)
  rows = decodelib.tune(dec, logits, refs, grid, nbest=5, scorer=scorer)
  assert len(rows) == 8
  lex = lexicon.build_lexicon(WORDS)
  for row in rows:
    fresh = beam_search.LexiconLMDecoder(
      lex, lm_path=weak, lm_weight=row["lm_weight"], blank_penalty=row["blank_penalty"]
    )
    nbests = [fresh.decode_nbest(lg, 5) for lg in logits]
    retuned = dec.retuned(lm_weight=row["lm_weight"], word_score=row["word_score"], blank_penalty=row["blank_penalty"])
    assert [retuned.decode_nbest(lg, 5) for lg in logits] == nbests  # same words and scores as a fresh decoder
    if row["rescore_weight"] is None:
      texts = [nb[0].text for nb in nbests]
    else:
      chosen = rescore.rescore(nbests, scorer, weight=1.0, word_bonus=0.0, gate_margin=0.0)
      texts = [nb[c.choice].text for nb, c in zip(nbests, chosen)]
    assert row["wer"] == decodelib.wer(texts, refs)
  first = min(r["wer"] for r in rows if r["rescore_weight"] is None)
  assert min(r["wer"] for r in rows if r["rescore_weight"] is not None) < first
  flags = decodelib.best_overrides(min(rows, key=lambda r: r["wer"]), has_lm=True)
  assert flags[0].startswith("--config.decode.lm_weight=") and "--config.decode.rescore.weight=1.0" in flags


def test_benchmark_decode_times_every_pass(trials, lms):
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import decodelib

  dec, _ = trials
  rng = np.random.default_rng(5)
  logits = [emissions("i read a book".split(), PRON, rng, noise=0.5) for _ in range(4)]
  calls = []

  def scorer(sentences):
    calls.append(len(sentences))
    return np.zeros(len(sentences))

  out = decodelib.benchmark({"lm": dec}, "lm", logits, {"zero": scorer}, nbest=3)
  assert list(out) == ["beam, lm", "rescore zero", "beam, lm + rescore zero"]
  assert calls == [3] * 8  # one call per trial: a warm-up pass, then the timed one
  for r in out.values():
    assert 0 < r["p50_ms"] <= r["p99_ms"] and r["mean_ms"] > 0
  assert out["beam, lm + rescore zero"]["mean_ms"] == pytest.approx(
    out["beam, lm"]["mean_ms"] + out["rescore zero"]["mean_ms"]
  )


def test_config_check_names_the_rescoring_fields_that_cannot_work():
  from b2t_jax import config_check
  from configs import default

  c = default.get_config()
  assert config_check.problems(c, n_devices=1, n_processes=1) == []
  c.decode.rescore.kind = "ngram"
  c.decode.beam_size = 5
  c.decode.nbest = 6
  c.decode.rescore.gate_margin = -1.0
  assert config_check.problems(c, n_devices=1, n_processes=1) == [
    "config.decode.rescore.gate_margin=-1.0: must be >= 0",
  ]
  c.decode.rescore.gate_margin = 0.0
  assert config_check.problems(c, n_devices=1, n_processes=1) == [
    "config.decode.nbest=6 exceeds config.decode.beam_size=5: the list comes from the beam",
    "config.decode.rescore.kind='ngram' needs config.decode.rescore.path (an LM file)",
  ]
  c.decode.nbest, c.decode.rescore.kind, c.decode.rescore.path = 1, "callable", "no_colon"
  assert config_check.problems(c, n_devices=1, n_processes=1) == [
    "config.decode.rescore.path='no_colon': a callable rescorer is given as 'module:function'",
    "config.decode.rescore.kind='callable' rescores the n-best list: set config.decode.nbest >= 2 (it is 1)",
  ]
  c.decode.rescore.kind = "llm"
  assert config_check.problems(c, n_devices=1, n_processes=1)[0].startswith(
    "config.decode.rescore.kind='llm': expected one of none, ngram, causal_lm, callable"
  )
