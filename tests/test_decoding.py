"""Word decoding (flashlight-text LexiconDecoder + CMUdict lexicon + KenLM) on synthetic CTC emissions, and
WER normalisation."""

import numpy as np
import pytest

from b2t_jax import metrics
from b2t_jax.data.synthetic import LEXICON
from b2t_jax.decoding import beam_search, lexicon, ngram
from b2t_jax.vocab import BLANK_ID, PHONEMES, SIL_ID

_ID = {p: i for i, p in enumerate(PHONEMES)}


def emissions(words, pronunciations, rng, noise=1.0):
  """CTC-like logits (T, 41) for `words`: each phoneme (then ` | `) peaks for 1-3 frames, blanks between some
  of them (always between two equal tokens), Gaussian noise on every logit."""
  ids = []
  for w in words:
    ids += [_ID[p] for p in pronunciations[w].split()] + [SIL_ID]
  frames = [BLANK_ID] * int(rng.integers(1, 4))
  for k, i in enumerate(ids):
    if (k and ids[k - 1] == i) or rng.random() < 0.4:
      frames.append(BLANK_ID)
    frames += [i] * int(rng.integers(1, 4))
  frames += [BLANK_ID] * int(rng.integers(1, 4))
  x = noise * rng.standard_normal((len(frames), len(PHONEMES)))
  x[np.arange(len(frames)), frames] += 6.0
  return x.astype(np.float32)


@pytest.fixture(scope="module")
def synthetic_lexicon():
  return lexicon.build_lexicon(sorted(LEXICON), source="synthetic lexicon")


def test_cmudict_agrees_with_the_synthetic_generator(synthetic_lexicon):
  """The generator's pronunciations are CMUdict's with stress stripped, so its sentences are decodable."""
  assert synthetic_lexicon.missing == []
  for w, pron in LEXICON.items():
    assert tuple(_ID[p] for p in pron.split()) in synthetic_lexicon.pronunciations[w], w
  # stress variants collapse: 'the' is DH AH0 / DH AH1 / DH IY0 in CMUdict -> two distinct spellings
  assert sorted(synthetic_lexicon.pronunciations["the"]) == [(_ID["DH"], _ID["AH"]), (_ID["DH"], _ID["IY"])]


def test_decodes_synthetic_emissions_of_known_sentences(synthetic_lexicon):
  rng = np.random.default_rng(0)
  dec = beam_search.LexiconLMDecoder(synthetic_lexicon)
  words = sorted(LEXICON)
  for _ in range(20):
    sentence = list(rng.choice(words, size=int(rng.integers(1, 8))))
    assert dec.decode(emissions(sentence, LEXICON, rng)) == " ".join(sentence)
  assert dec.decode(np.zeros((0, len(PHONEMES)), np.float32)) == ""
  with pytest.raises(ValueError, match="41"):
    dec.decode(np.zeros((5, 40), np.float32))


def test_lexicon_beats_greedy_on_noisy_emissions(synthetic_lexicon):
  """At a noise level where the greedy phoneme path is often wrong, the lexicon constraint still recovers most
  words: WER well below the greedy PER."""
  rng = np.random.default_rng(1)
  dec = beam_search.LexiconLMDecoder(synthetic_lexicon)
  words = sorted(LEXICON)
  wer, per = metrics.ErrorRate(), metrics.ErrorRate()
  for _ in range(30):
    sentence = list(rng.choice(words, size=5))
    x = emissions(sentence, LEXICON, rng, noise=2.0)
    ref_ids = [_ID[p] for w in sentence for p in LEXICON[w].split() + [" | "]]
    per.add(0, metrics.greedy_decode(x.argmax(-1), len(x)), ref_ids)
    wer.add(0, dec.decode(x).split(), sentence)
  assert per.rate() > 0.15
  assert wer.rate() < 0.5 * per.rate()


def _lm(tmp_path, name, lines, order=2):
  counts = ngram.count_ngrams((line.split() for line in lines), order)
  probs, backoffs, _ = ngram.kneser_ney(counts)
  path = str(tmp_path / f"{name}.arpa")
  ngram.write_arpa(path, probs, backoffs)
  return path


def test_lm_chooses_between_homophones(tmp_path):
  """'red' and 'read' share the spelling R EH D: the acoustics cannot separate them, the LM does."""
  lex = lexicon.build_lexicon(["i", "red", "read", "a", "book", "car"])
  assert (_ID["R"], _ID["EH"], _ID["D"]) in lex.pronunciations["red"]
  assert (_ID["R"], _ID["EH"], _ID["D"]) in lex.pronunciations["read"]
  likes_read = _lm(tmp_path, "read", ["i read a book"] * 9 + ["a red car"])
  likes_red = _lm(tmp_path, "red", ["i red a book"] * 9 + ["a read car"])
  pron = {"i": "AY", "red": "R EH D", "a": "AH", "book": "B UH K"}
  rng = np.random.default_rng(2)
  x = emissions(["i", "red", "a", "book"], pron, rng, noise=0.3)
  # Without an LM the two tie exactly; the tie goes to the word listed first, on every run.
  assert beam_search.LexiconLMDecoder(lex).decode(x) == "i red a book"
  swapped = lexicon.build_lexicon(["i", "read", "red", "a", "book", "car"])
  assert beam_search.LexiconLMDecoder(swapped).decode(x) == "i read a book"
  assert beam_search.LexiconLMDecoder(lex, lm_path=likes_read).decode(x) == "i read a book"
  assert beam_search.LexiconLMDecoder(lex, lm_path=likes_red).decode(x) == "i red a book"


def test_missing_words_are_reported_not_dropped(caplog):
  with caplog.at_level("WARNING"):
    lex = lexicon.build_lexicon(["hello", "qzxvbn", "world", "<s>", "hello"], source="test vocabulary")
  assert lex.words == ["hello", "world"] and lex.missing == ["qzxvbn"]
  assert "1 of 3 words of the test vocabulary" in caplog.text and "qzxvbn" in caplog.text


def test_lexicon_file_adds_and_overrides_pronunciations(tmp_path, synthetic_lexicon):
  path = tmp_path / "extra.txt"
  path.write_text("# user words\nqzxvbn K W IH1 Z\nwater W AA1 T ER0\n")
  extra = lexicon.read_lexicon_file(str(path))
  lex = lexicon.build_lexicon(["qzxvbn", "water", "the"], extra)
  assert lex.missing == [] and lex.pronunciations["water"] == [(_ID["W"], _ID["AA"], _ID["T"], _ID["ER"])]
  rng = np.random.default_rng(4)
  x = emissions(["the", "qzxvbn"], {"the": "DH AH", "qzxvbn": "K W IH Z"}, rng, noise=0.3)
  assert beam_search.LexiconLMDecoder(lex).decode(x) == "the qzxvbn"
  path.write_text("bad XX Y\n")
  with pytest.raises(ValueError, match="extra.txt:1: pronunciation of 'bad': 'XX'"):
    lexicon.read_lexicon_file(str(path))


def test_homophones_beyond_the_trie_limit_are_reported(tmp_path, caplog):
  """flashlight's trie holds 6 words per spelling; the 7th and 8th are reported, the LM's favourites kept."""
  words = [f"w{i}" for i in range(8)]
  extra = {w: [(_ID["K"], _ID["AA"])] for w in words}
  lex = lexicon.build_lexicon(words, extra)
  with caplog.at_level("WARNING"):
    dec = beam_search.LexiconLMDecoder(lex)
  assert dec.undecodable == ["w6", "w7"] and "2 of them cannot be decoded" in caplog.text
  lm = _lm(tmp_path, "w7", ["w7"] * 5 + ["w6"] * 4 + [" ".join(words)])
  assert "w7" not in beam_search.LexiconLMDecoder(lex, lm_path=lm).undecodable
  x = emissions(["w0"], {"w0": "K AA"}, np.random.default_rng(5), noise=0.3)
  assert beam_search.LexiconLMDecoder(lex, lm_path=lm).decode(x) == "w7"


def test_wer_normalisation_follows_the_reference():
  assert metrics.normalize_sentence("Hello, World!  It's a well-known FACT.") == "hello world it's a well-known fact"
  # as the reference: a hyphen before a space goes, a lone one stays; " '" joins the quote to its word
  assert metrics.normalize_sentence("I said -- twice - no 'quote'") == "i said - twice no'quote'"
  wer = metrics.ErrorRate()
  wer.add(0, "hello word".split(), metrics.sentence_words("Hello, world! Again."))
  assert wer.rate() == pytest.approx(2 / 3)  # one substitution, one deletion over three words


def arpa_log10(path, words):
  """log10 P(<s> words </s>) by the ARPA back-off rule, read with our own reader (independent of KenLM)."""
  probs, backoffs = ngram.read_arpa(path)
  order = len(probs)
  tokens = [ngram.BOS, *[w if (w,) in probs[0] else ngram.UNK for w in words], ngram.EOS]
  total = 0.0
  for i in range(1, len(tokens)):
    hist = tuple(tokens[max(0, i - order + 1) : i])
    while True:
      gram = (*hist, tokens[i])
      if gram in probs[len(gram) - 1]:
        total += probs[len(gram) - 1][gram]
        break
      total += backoffs[len(hist) - 1].get(hist, 0.0) if hist else 0.0
      hist = hist[1:]
  return total


def test_nbest_lists_distinct_sentences_with_their_scores(tmp_path):
  """The n-best list: distinct word sequences, best first; total = acoustic + lm_weight·lm + word_score·#words
  (sil_score 0), and `lm` is the LM's log10 probability of the sentence by the ARPA back-off rule."""
  lex = lexicon.build_lexicon(["i", "red", "read", "a", "book", "car"])
  lm = _lm(tmp_path, "read", ["i read a book"] * 9 + ["a red car"])
  pron = {"i": "AY", "red": "R EH D", "a": "AH", "book": "B UH K"}
  x = emissions(["i", "red", "a", "book"], pron, np.random.default_rng(2), noise=1.0)
  dec = beam_search.LexiconLMDecoder(lex, lm_path=lm, lm_weight=2.0, word_score=0.5)
  nbest = dec.decode_nbest(x, 6)
  assert len(nbest) == 6 and len({h.words for h in nbest}) == 6
  assert [h.total for h in nbest] == sorted((h.total for h in nbest), reverse=True)
  assert nbest[0].words == ("i", "read", "a", "book") and nbest[1].words == ("i", "red", "a", "book")
  for h in nbest:
    assert h.total == pytest.approx(h.acoustic + 2.0 * h.lm + 0.5 * len(h.words), abs=1e-3)
    assert h.lm == pytest.approx(arpa_log10(lm, h.words), abs=1e-4)
  # homophones: same path, same acoustic score
  assert nbest[0].acoustic == pytest.approx(nbest[1].acoustic, abs=1e-5)
  assert dec.decode(x) == nbest[0].text and dec.decode_nbest(x, 1) == nbest[:1]


def test_lexicon_only_nbest_keeps_distinct_histories():
  """Without an LM the search keeps one LM state per word history (as flashlight's zero LM does), so its n-best
  list holds several sentences, the homophone tie broken by lexicon order."""
  lex = lexicon.build_lexicon(["i", "red", "read", "a", "book", "car"])
  pron = {"i": "AY", "red": "R EH D", "a": "AH", "book": "B UH K"}
  x = emissions(["i", "red", "a", "book"], pron, np.random.default_rng(2), noise=1.0)
  nbest = beam_search.LexiconLMDecoder(lex).decode_nbest(x, 4)
  assert [h.text for h in nbest[:2]] == ["i red a book", "i read a book"]
  assert len(nbest) == 4 and len({h.words for h in nbest}) == 4
  assert nbest[0].total - nbest[1].total == pytest.approx(1e-3 / 7, rel=1e-2)  # the tie-break ε of one index
