"""Learns pronunciations from labelled t15 trials and writes them as a CMUdict-style lexicon file.

python tools/build_lexicon.py --data_dir=/data/hdf5_data_final --out=lexicon.txt [--split=train] [--all_words]

The t15 phoneme labels put the word boundary ` | ` after every word, so each transcript gives each of its words
the phonemes it was spoken with. Every observed variant is kept with its count (`word PH PH ...  # N trials`,
most frequent first), for the words CMUdict lacks (or, with --all_words, every word). `config.decode.lexicon_path`
reads the file; mode=infer learns the same pronunciations by itself, so the file is for reading, editing and
decoding elsewhere. Transcripts whose word count differs from their boundary count are listed by trial in
OUT.mismatched.tsv, never guessed. --data_dir is an hdf5_data_final-style tree (labels read without the
features) or a prepared dataset.
"""

from __future__ import annotations

from absl import app, flags

from b2t_jax.decoding import lexicon

_DATA_DIR = flags.DEFINE_string("data_dir", None, "t15 hdf5_data_final-style folder or prepared dataset", required=True)
_SPLIT = flags.DEFINE_string("split", "train", "labelled split to learn from (train or val)")
_OUT = flags.DEFINE_string("out", None, "output lexicon path", required=True)
_ALL = flags.DEFINE_bool("all_words", False, "also write the words CMUdict knows (their observed variants)")


def build(data_dir: str, split: str, out: str, all_words: bool) -> dict:
  """Learns from `split` of `data_dir`, writes `out` (and `out`.mismatched.tsv when needed); returns counts."""
  learned = lexicon.learn_pronunciations(lexicon.dataset_transcripts(data_dir, split))
  n_lines = lexicon.write_lexicon_file(out, learned, only_missing_from_cmudict=not all_words)
  cmu = lexicon.cmudict_pronunciations()
  info = {
    "transcripts": learned.n_transcripts,
    "mismatched": len(learned.mismatched),
    "words": len(learned.counts),
    "not_in_cmudict": sum(w not in cmu for w in learned.counts),
    "lines": n_lines,
  }
  if learned.mismatched:
    with open(out + ".mismatched.tsv", "w", encoding="utf-8") as f:
      f.write("".join(f"{where}\t{why}\n" for where, why in learned.mismatched))
  return info


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  info = build(_DATA_DIR.value, _SPLIT.value, _OUT.value, _ALL.value)
  written = info["words"] if _ALL.value else info["not_in_cmudict"]
  print(
    f"wrote {_OUT.value}: {info['lines']} pronunciations of {written}"
    f" words ({info['words']} words in {info['transcripts']} transcripts, {info['not_in_cmudict']} not in CMUdict); "
    f"{info['mismatched']} transcripts with word/boundary counts that disagree"
    + (f" (listed in {_OUT.value}.mismatched.tsv)" if info["mismatched"] else "")
  )


if __name__ == "__main__":
  app.run(main)
