"""Pronunciations learned from word-segmented t15 labels (b2t_jax/decoding/lexicon.py, tools/build_lexicon.py): the
counts, the precedence over CMUdict, the reported mismatches, and a word CMUdict lacks decoded from them."""

import os
import sys

import h5py
import numpy as np
import pytest
from conftest import ROOT
from test_decoding import emissions

from b2t_jax.decoding import beam_search, lexicon
from b2t_jax.vocab import PHONEMES, SIL_ID

_ID = {p: i for i, p in enumerate(PHONEMES)}
ZORBLAT = "Z AO R B L AE T"  # a word CMUdict lacks
ZORBLAT_VARIANT = "Z AO R B L AH T"
THE_OBSERVED = "DH IH"  # not one of CMUdict's spellings of 'the'


def ids(pron: str) -> tuple[int, ...]:
  return tuple(_ID[p] for p in pron.split())


def labels(*prons: str) -> list[int]:
  """t15 labels: each word's phonemes, then the boundary."""
  return [i for p in prons for i in (*ids(p), SIL_ID)]


TRANSCRIPTS = [
  ("s/trial_0000", "The zorblat.", labels("DH AH", ZORBLAT)),
  ("s/trial_0001", "Zorblat!", labels(ZORBLAT) + [SIL_ID]),  # a repeated boundary is silence, not a word
  ("s/trial_0002", "the ZORBLAT", labels(THE_OBSERVED, ZORBLAT_VARIANT)),
  ("s/trial_0003", "zorblat the", labels(ZORBLAT, "DH AH")),
  ("s/trial_0004", "the zorblat went", labels("DH AH", ZORBLAT)),  # 3 words, 2 segments: reported, not used
]


def test_pronunciations_are_learned_from_word_segmented_labels():
  assert lexicon.word_segments([*labels("DH AH", ZORBLAT), SIL_ID, 0, 0]) == [ids("DH AH"), ids(ZORBLAT)]
  assert lexicon.word_segments(ids("DH AH")) == [ids("DH AH")]  # a last word without its boundary
  learned = lexicon.learn_pronunciations(TRANSCRIPTS)
  assert learned.n_transcripts == 5
  assert learned.counts == {
    "the": {ids("DH AH"): 2, ids(THE_OBSERVED): 1},
    "zorblat": {ids(ZORBLAT): 3, ids(ZORBLAT_VARIANT): 1},
  }
  assert learned.mismatched == [("s/trial_0004", "3 words in 'the zorblat went' but 2 word segments in its labels")]
  assert learned.variants("zorblat") == [ids(ZORBLAT), ids(ZORBLAT_VARIANT)]  # most frequent first


def test_learned_pronunciations_spell_the_words_cmudict_lacks(caplog):
  learned = lexicon.learn_pronunciations(TRANSCRIPTS)
  cmu_the = list(lexicon.cmudict_pronunciations()["the"])
  with caplog.at_level("WARNING"):
    lex = lexicon.build_lexicon(["the", "zorblat", "went", "qzxvbn"], None, learned)
  assert lex.words == ["the", "zorblat", "went"] and lex.missing == ["qzxvbn"] and lex.learned == ["zorblat"]
  assert lex.pronunciations["zorblat"] == [ids(ZORBLAT), ids(ZORBLAT_VARIANT)]
  assert lex.pronunciations["the"] == cmu_the  # CMUdict's words keep CMUdict's spellings
  assert "1 of 4 words" in caplog.text and "qzxvbn" in caplog.text
  with_variants = lexicon.build_lexicon(["the", "zorblat"], None, learned, variants=True)
  assert with_variants.pronunciations["the"] == [*cmu_the, ids(THE_OBSERVED)]  # CMUdict first, new variants after
  assert with_variants.learned == ["the", "zorblat"]
  user = lexicon.build_lexicon(["zorblat"], {"zorblat": [ids("Z AO R")]}, learned, variants=True)
  assert user.pronunciations["zorblat"] == [ids("Z AO R")]  # the user's file overrides everything
  with pytest.raises(lexicon.VocabularyError, match="no word of the vocabulary has a pronunciation"):
    lexicon.build_lexicon(["qzxvbn"], None, learned)


def test_a_word_cmudict_lacks_is_decoded_from_the_trials():
  learned = lexicon.learn_pronunciations(TRANSCRIPTS)
  x = emissions(["the", "zorblat"], {"the": "DH AH", "zorblat": ZORBLAT}, np.random.default_rng(3), noise=0.5)
  assert (
    beam_search.LexiconLMDecoder(lexicon.build_lexicon(["the", "zorblat"], None, learned)).decode(x) == "the zorblat"
  )
  without = lexicon.build_lexicon(["the", "zorblat"])  # CMUdict alone: zorblat is missing, never decoded
  assert without.missing == ["zorblat"] and "zorblat" not in beam_search.LexiconLMDecoder(without).decode(x)


def _write_tree(root):
  """A t15 tree of one session whose train file holds TRANSCRIPTS (labels zero-padded, no real features)."""
  os.makedirs(root / "t15.2023.08.11")
  with h5py.File(root / "t15.2023.08.11" / "data_train.hdf5", "w") as f:
    for k, (_, sentence, lab) in enumerate(TRANSCRIPTS):
      g = f.create_group(f"trial_{k:04d}")
      g.create_dataset("input_features", data=np.zeros((20, 4), np.float32))
      g.create_dataset("seq_class_ids", data=np.pad(np.asarray(lab, np.int32), (0, 30 - len(lab))))
      g.attrs.update(seq_len=len(lab), sentence_label=sentence)


def test_build_lexicon_tool_writes_what_decode_lexicon_path_reads(tmp_path):
  from absl import flags

  sys.path.insert(0, os.path.join(ROOT, "tools"))
  defined = set(flags.FLAGS)
  import build_lexicon

  # its required --data_dir/--out would otherwise stay in absl's global flags for every later test of this worker
  # that parses b2t_jax.main's flags (test_main's documented commands); build() takes its arguments directly
  for name in set(flags.FLAGS) - defined:
    delattr(flags.FLAGS, name)

  _write_tree(tmp_path / "tree")
  out = str(tmp_path / "lexicon.txt")
  info = build_lexicon.build(str(tmp_path / "tree"), "train", out, all_words=False)
  assert info == {"transcripts": 5, "mismatched": 1, "words": 2, "not_in_cmudict": 1, "lines": 2}
  text = open(out).read().splitlines()
  assert text[1:] == ["zorblat Z AO R B L AE T  # 3 trials", "zorblat Z AO R B L AH T  # 1 trial"]
  assert lexicon.read_lexicon_file(out) == {"zorblat": [ids(ZORBLAT), ids(ZORBLAT_VARIANT)]}
  assert open(out + ".mismatched.tsv").read().startswith("t15.2023.08.11/trial_0004\t3 words in")
  build_lexicon.build(str(tmp_path / "tree"), "train", out, all_words=True)
  assert lexicon.read_lexicon_file(out)["the"] == [ids("DH AH"), ids(THE_OBSERVED)]
