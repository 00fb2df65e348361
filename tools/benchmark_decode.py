"""Per-trial time of word decoding: the beam (lexicon only, and with the first-pass LM) and each rescorer.

python tools/benchmark_decode.py --config=configs/demo.py --workdir=DIR --config.data.data_dir=... \
    --config.decode.lm_path=lm.arpa --config.decode.nbest=10 [--ngram=big.arpa] [--causal_lm=MODEL_DIR] \
    [--random_causal_lm=DIR --random_causal_lm_size=2x64] [--callable=module:function] [--split=val]

The split's scores come from the workdir's checkpoint once; then every trial is decoded one at a time, as a
live decoder would: the beam with its n-best list (decode.nbest), then each rescorer on that trial's list alone
(every trial rescored, no gate). Each rescorer first runs once over all trials untimed (a causal LM compiles one
program per padded length). Prints a table of p50 / p99 / mean milliseconds per trial (and the load average it
ran under) and writes it as JSON to --out. `--random_causal_lm=DIR` writes a randomly initialised GPT-2 over the
lexicon's words to DIR and times it: its time depends on its size, not on its weights (never a download).
"""

from __future__ import annotations

import json
import os

import benchlib  # tools/ is the script's own folder
import decodelib
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from b2t_jax import config_check, infer
from b2t_jax.decoding import rescore

_CONFIG = config_flags.DEFINE_config_file("config", None, "path to a configs/*.py file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "the trained workdir whose checkpoint scores the split")
_SPLIT = flags.DEFINE_string("split", "val", "split to decode")
_MAX_TRIALS = flags.DEFINE_integer("max_trials", 0, "time the first N trials (0 = all)")
_NGRAM = flags.DEFINE_string("ngram", "", "an n-gram LM (ARPA or KenLM binary) to time as rescorer")
_CAUSAL = flags.DEFINE_string("causal_lm", "", "a local HuggingFace-format causal LM directory to time as rescorer")
_RANDOM = flags.DEFINE_string("random_causal_lm", "", "write a random GPT-2 over the lexicon here and time it")
_RANDOM_SIZE = flags.DEFINE_string("random_causal_lm_size", "2x64", "LAYERSxWIDTH of --random_causal_lm")
_CALLABLE = flags.DEFINE_string("callable", "", "a 'module:function' sentence scorer to time as rescorer")
_BUSY_LOAD = flags.DEFINE_float("busy_load", 1.0, "load average above which the figures are flagged as not quiet")
_OUT = flags.DEFINE_string("out", "", "JSON output; empty = WORKDIR/benchmark_decode.json")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required (a trained workdir)")
  config = _CONFIG.value
  config_check.validate(config)
  config = ml_collections.FrozenConfigDict(config)
  scores = infer.split_scores(config, _WORKDIR.value, _SPLIT.value, _MAX_TRIALS.value)
  words = infer.build_word_decoding(config, scores.dataset_dir)
  decoders = {"lexicon only": words.no_lm}
  if words.has_lm:
    decoders["lexicon + LM"] = words.first_pass
  first = "lexicon + LM" if words.has_lm else "lexicon only"
  scorers: dict[str, rescore.SentenceScorer] = {}
  if _NGRAM.value:
    scorers[f"ngram {os.path.basename(_NGRAM.value)}"] = rescore.NgramScorer(_NGRAM.value, words.lexicon.words)
  causal = _CAUSAL.value
  if _RANDOM.value:
    layers, width = (int(v) for v in _RANDOM_SIZE.value.lower().split("x"))
    decodelib.write_random_causal_lm(_RANDOM.value, words.lexicon.words, n_layer=layers, n_embd=width)
    causal = _RANDOM.value
  if causal:
    from b2t_jax.decoding import causal_lm

    scorer = causal_lm.CausalLMScorer(causal, batch_size=config.decode.rescore.batch_size)
    scorers[f"causal_lm {os.path.basename(os.path.normpath(causal))} ({scorer.n_params:,} params)"] = scorer
  if _CALLABLE.value:
    scorers[f"callable {_CALLABLE.value}"] = rescore.CallableScorer(_CALLABLE.value)
  load, cpu = benchlib.load_average(), benchlib.cpu_snapshot()
  result = decodelib.benchmark(decoders, first, scores.logits, scorers, config.decode.nbest)
  machine = benchlib.load_report(
    load, benchlib.load_average(), _BUSY_LOAD.value, benchlib.others_share(cpu, benchlib.cpu_snapshot())
  )
  print(
    f"{len(scores.logits)} {_SPLIT.value} trials, {len(words.lexicon.words)} words, nbest {config.decode.nbest}, "
    f"beam {config.decode.beam_size}; load average {machine['load_before']} before, {machine['load_after']} after"
    + (f", others used {machine['others_cpu_share']:.0%} of the CPU" if "others_cpu_share" in machine else "")
  )
  print("| per trial | p50 ms | p99 ms | mean ms |\n|---|---|---|---|")
  for name, r in result.items():
    print(f"| {name} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_ms']:.2f} |")
  out = _OUT.value or os.path.join(_WORKDIR.value, "benchmark_decode.json")
  with open(out, "w", encoding="utf-8") as f:
    json.dump(
      {"trials": len(scores.logits), "nbest": config.decode.nbest, "machine": machine, "timings": result}, f, indent=1
    )


if __name__ == "__main__":
  app.run(main)
