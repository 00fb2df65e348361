"""Tunes word decoding on the val split of a trained workdir: a grid over the beam's lm_weight, word_score and
blank_penalty and, with a rescorer, over the rescoring weight and word bonus.

python tools/tune_decode.py --config=configs/demo.py --workdir=DIR --config.data.data_dir=... \
    --config.decode.lm_path=lm.arpa [--config.decode.nbest=10 --config.decode.rescore.kind=ngram \
    --config.decode.rescore.path=big.arpa] --lm_weight=1,2,4 --word_score=0,1,2 --blank_penalty=0,2 \
    [--rescore_weight=0.5,1,2 --rescore_word_bonus=0,1] --out=DIR/tune_decode

The val scores are computed once (the checkpoint's forward pass); each first-pass point decodes every trial with
the n-best list kept, and every rescoring point re-ranks those lists (the rescorer scores each distinct sentence
once per first-pass point). Writes OUT/points.csv (every point tried with its WER; `rescore_weight` empty for
the first pass alone) and OUT/best_overrides.txt (the best point as `--config.decode.*` flags to add to
mode=infer), and prints the best line. Without `decode.lm_path` the beam has no LM: lm_weight is not searched
and word_score sets `decode.word_score_no_lm`.
"""

from __future__ import annotations

import csv
import os

import decodelib  # tools/ is the script's own folder
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from b2t_jax import config_check, infer

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the trained workdir whose checkpoint scores the val split")
_LM_WEIGHT = flags.DEFINE_list("lm_weight", ["1", "2", "3", "4"], "first-pass lm_weight values (with decode.lm_path)")
_WORD_SCORE = flags.DEFINE_list("word_score", ["0", "1", "2"], "first-pass word_score values")
_BLANK = flags.DEFINE_list("blank_penalty", ["0"], "blank_penalty values")
_RW = flags.DEFINE_list("rescore_weight", ["0.5", "1", "2"], "rescore.weight values (with decode.rescore.kind)")
_RB = flags.DEFINE_list("rescore_word_bonus", ["0", "1", "2"], "rescore.word_bonus values")
_MAX_TRIALS = flags.DEFINE_integer("max_trials", 0, "tune on the first N val trials (0 = all)")
_OUT = flags.DEFINE_string("out", "", "output folder; empty = WORKDIR/tune_decode")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (a trained workdir)")
  config = _CONFIG.value
  config_check.validate(config)
  config = ml_collections.FrozenConfigDict(config)
  dc = config.decode
  grid = {
    k: [float(v) for v in f.value]
    for k, f in zip(decodelib.FIRST_PASS + decodelib.SECOND_PASS, (_LM_WEIGHT, _WORD_SCORE, _BLANK, _RW, _RB))
  }
  if not dc.lm_path:
    grid["lm_weight"] = [dc.lm_weight]  # no LM in the beam: nothing to weight
  scores = infer.split_scores(config, _WORKDIR.value, "val", _MAX_TRIALS.value)
  words = infer.build_word_decoding(config, scores.dataset_dir)
  rows = decodelib.tune(
    words.first_pass,
    scores.logits,
    scores.refs,
    grid,
    nbest=dc.nbest,
    scorer=words.scorer,
    gate_margin=dc.rescore.gate_margin,
  )
  out = _OUT.value or os.path.join(_WORKDIR.value, "tune_decode")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "points.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=[*decodelib.FIRST_PASS, *decodelib.SECOND_PASS, "wer"])
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if v is None else v) for k, v in r.items()})
  best = min(rows, key=lambda r: r["wer"])  # ties: the first point tried
  flags_text = " ".join(decodelib.best_overrides(best, bool(dc.lm_path)))
  with open(os.path.join(out, "best_overrides.txt"), "w", encoding="utf-8") as f:
    f.write(flags_text + "\n")
  print(f"{len(rows)} points on {len(scores.logits)} val trials (step {scores.step}); wrote {out}/points.csv")
  print(f"best wer={best['wer']:.4f}: {flags_text}")


if __name__ == "__main__":
  app.run(main)
