"""mode=infer: a checkpoint -> per-trial logits of one split (batched, jitted) -> greedy phonemes and words.

python -m b2t_jax.main --config=CONFIG.py --workdir=DIR --config.mode=infer [--config.decode.lm_path=lm.arpa]

Restores DIR/best (else DIR/checkpoints), runs `config.infer.split` and writes into `config.infer.out_dir`
(default DIR/infer_<split>):
- submission.csv  `id,text`: ids 0..N-1 in split order (session-list order, then file order; SPEC §5)
- trials.jsonl    one object per trial: id, session, day, block, trial, greedy phonemes, words without and with
                  the LM, the true sentence and phonemes when the split is labelled
- per_day.csv     per-day greedy PER and WERs (labelled splits), per_day.png the same as a plot
- skipped_trials.json  the split's skip counts (the workdir itself is only read: it may be read-only)
- metrics.json    the aggregate numbers; logits.npz (with infer.save_logits) the raw logits per trial
- missing_words.txt  words of the decoding vocabulary without a pronunciation (when there are any); words that
                  lost every trie slot to more probable homophones are listed in metrics.json
The text of the CSV is the LM decoding when `config.decode.lm_path` is set, else the lexicon-only decoding.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from b2t_jax import evaluation, experiment, sharding, steps, vocab
from b2t_jax import metrics as metrics_lib
from b2t_jax import workdir as workdir_lib
from b2t_jax.data import pipeline, t15
from b2t_jax.decoding import lexicon_lm, ngram

NO_LM, WITH_LM = "lexicon", "lm"


def logits_step(params: Any, batch: dict, *, model, config: ml_collections.ConfigDict) -> dict:
  """Inference forward pass on a padded batch: float32 logits (B, P, 41) (an ensemble's merged log-probabilities)
  and the valid patch count per trial."""
  logits, input_lens, _ = steps.ensemble_logits(params, batch, model=model, config=config)
  return {"logits": logits.astype(jnp.float32), "input_lens": jnp.maximum(input_lens, 0)}


# What separately trained workdirs must share to be merged frame by frame (infer.ensemble_workdirs).
MERGE_FIELDS = (
  "model.patch_size",
  "model.patch_stride",
  "model.n_classes",
  "data.n_features",
  "data.feature_pool",
  "data.sessions",
)


def member_logits(
  exp: experiment.Experiment, params: Any, member: int, split: pipeline.DataSplit
) -> dict[int, np.ndarray]:
  """`split_logits` of member `member` alone of an ensemble's stacked `params` (config.infer.member)."""
  k = exp.n_models
  if k == 1 and member == 0:
    return split_logits(exp, params, split)
  if not 0 <= member < k:
    raise ValueError(f"config.infer.member={member}: this workdir holds {k} member(s) (config.train.n_models)")
  single = ml_collections.ConfigDict(exp.config.to_dict())
  single.train.n_models = 1
  one = experiment.Experiment(single, mesh=exp.mesh)
  return split_logits(one, jax.device_put(jax.tree.map(lambda a: a[member], params), one.param_shardings), split)


def ensemble_logits(
  config: ml_collections.ConfigDict, workdir: str, split: pipeline.DataSplit
) -> tuple[dict[int, np.ndarray], int]:
  """Record index -> (P, 41) scores of `split` from the workdir's checkpoint, merged with those of every workdir
  of `config.infer.ensemble_workdirs` (each restored with its own recorded config) by the mean log-probability
  of all their members (a K-member workdir counts K times). Returns (scores, the main checkpoint's step)."""
  sources = [(config, workdir)] + [
    (workdir_lib.recorded_config(w), w) for w in config.infer.ensemble_workdirs.split(",") if w.strip()
  ]
  flat = workdir_lib.flat_config(config)
  total: dict[int, np.ndarray] = {}
  members, step = 0, 0
  for i, (cfg, wd) in enumerate(sources):
    if i:
      # This machine's launch settings, not the recorded ones (all safe to change on a workdir).
      for field in ("mesh_shape", "logical_axis_rules"):
        cfg[field] = config[field]
      for field in ("eval_batch_size", "prefetch", "prefetch_workers"):
        cfg.data[field] = config.data[field]
      other = workdir_lib.flat_config(cfg)
      bad = [f"{k}: {flat[k]!r} here, {other.get(k)!r} in {wd}" for k in MERGE_FIELDS if other.get(k) != flat[k]]
      if bad:
        raise ValueError(
          f"config.infer.ensemble_workdirs: {wd} cannot be merged with {workdir} frame by frame:\n  " + "\n  ".join(bad)
        )
    exp = experiment.Experiment(cfg)
    state = evaluation.restore_for_reading(exp, wd, config.infer.checkpoint)
    step = step if i else int(jax.device_get(state.step))
    if len(sources) == 1 and config.infer.member >= 0:
      return member_logits(exp, state.params, config.infer.member, split), step
    if len(sources) == 1:
      return split_logits(exp, state.params, split), step
    k = cfg.train.n_models
    for record, lg in split_logits(exp, state.params, split).items():
      logp = k * np.asarray(jax.nn.log_softmax(lg, axis=-1))
      total[record] = logp if record not in total else total[record] + logp
    members += k
  # Each workdir's scores are log-probabilities up to a per-frame constant, so renormalising the weighted sum gives
  # the mean log-probability of all members exactly (steps.merge_log_probs).
  return {r: np.asarray(jax.nn.log_softmax(v / members, axis=-1)) for r, v in total.items()}, step


def split_logits(exp: experiment.Experiment, params: Any, split: pipeline.DataSplit) -> dict[int, np.ndarray]:
  """Record index -> logits (n_patches_i, 41) of every kept trial of `split`; each process reads its rows."""
  cfg = exp.config
  data = sharding.batch_sharding(exp.mesh)
  step = jax.jit(
    functools.partial(logits_step, model=exp.model, config=cfg),
    in_shardings=(exp.state_shardings.params, data),
    out_shardings=data,
  )
  out: dict[int, np.ndarray] = {}
  plan = pipeline.eval_plan(split, cfg.data.eval_batch_size)
  for idx, gb in tqdm(
    evaluation.eval_batches(exp, split, plan),
    total=len(plan),
    desc=f"{split.name} logits",
    unit="batch",
    disable=jax.process_index() > 0,
  ):
    res = sharding.to_host(step(params, gb))
    for r, i in enumerate(idx):
      out[int(i)] = np.asarray(res["logits"][r, : int(res["input_lens"][r])])
  return out


def split_trials(split: pipeline.DataSplit, chunk: int) -> Iterator[tuple[int, t15.Trial]]:
  """(record index, trial) of every kept trial in record order (SPEC §5 order), read `chunk` at a time so that
  only one chunk's features are in memory."""
  kept = np.flatnonzero(split.keep)
  for start in range(0, len(kept), chunk):
    idx = kept[start : start + chunk]
    yield from zip(idx.tolist(), split.read(idx))


def build_decoders(
  config: ml_collections.ConfigDict, dataset_dir: str
) -> tuple[dict[str, lexicon_lm.LexiconLMDecoder], lexicon_lm.Lexicon, str]:
  """The lexicon-only decoder and, when `config.decode.lm_path` is set, the LM decoder, over one lexicon
  (vocabularies drawn from the training sentences read them from the prepared `dataset_dir`)."""
  dc = config.decode
  needs_train = dc.vocabulary in ("train", "cmudict") or (dc.vocabulary == "auto" and not dc.lm_path)
  sentences = list(ngram.dataset_sentences(dataset_dir, "train")) if needs_train else None
  vocab, source = lexicon_lm.decoding_vocabulary(dc, sentences)
  extra = lexicon_lm.read_lexicon_file(dc.lexicon_path) if dc.lexicon_path else None
  lexicon = lexicon_lm.build_lexicon(vocab, extra, source=source)
  decoders = {NO_LM: lexicon_lm.LexiconLMDecoder.from_config(lexicon, dc, use_lm=False)}
  if dc.lm_path:
    decoders[WITH_LM] = lexicon_lm.LexiconLMDecoder.from_config(lexicon, dc, use_lm=True)
  logging.info(
    "decoding vocabulary: %d words from %s (%d without pronunciation)", len(lexicon.words), source, len(lexicon.missing)
  )
  return decoders, lexicon, source


def phoneme_string(ids) -> str:
  return " ".join(vocab.PHONEMES[i].strip() for i in ids)


def run_inference(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs mode=infer (see module doc); returns the aggregate metrics, per-day metrics and output paths."""
  ic = config.infer
  if ic.split not in t15.SPLITS:
    raise ValueError(f"config.infer.split={ic.split!r}: expected one of {t15.SPLITS}")
  out_dir = ic.out_dir or os.path.join(workdir, f"infer_{ic.split}")
  split = experiment.open_data(config, workdir, (ic.split,), report_dir=out_dir)[ic.split]
  skipped = {f"{stage}:{reason}": n for stage, counts in split.skipped.items() for reason, n in counts.items() if n}
  if ic.split == "test" and skipped:
    # Competition ids are positions among all test trials (SPEC §5): a skipped trial would shift every later id.
    raise t15.DataError(
      f"{split.dataset_dir}: the test split had trials skipped ({skipped}); the competition "
      "CSV needs every test trial in release order. Prepare and run with "
      "--config.data.on_bad_trial=error to see which trial is bad"
    )
  record_logits, step = ensemble_logits(config, workdir, split)
  decoders, lexicon, vocab_source = build_decoders(config, split.dataset_dir)
  labelled = ic.split != "test"

  per = metrics_lib.ErrorRate()
  wer = {name: metrics_lib.ErrorRate() for name in decoders}
  records, logits = [], []
  trials = split_trials(split, config.data.eval_batch_size)
  for i, (record, trial) in enumerate(
    tqdm(trials, total=len(split), desc="decoding", unit="trial", disable=jax.process_index() > 0)
  ):
    lg = record_logits.pop(record)
    logits.append(lg)
    greedy = metrics_lib.greedy_decode(np.argmax(lg, axis=-1), lg.shape[0])
    words = {name: dec.decode(lg) for name, dec in decoders.items()}
    rec = {
      "id": i,
      "session": trial.session,
      "day": trial.day,
      "block": trial.block,
      "trial": trial.trial,
      "index_in_file": trial.index_in_file,
      "greedy_phonemes": phoneme_string(greedy),
      "words_no_lm": words[NO_LM],
      "words_lm": words.get(WITH_LM),
    }
    if labelled:
      rec["true_sentence"] = trial.sentence
      rec["true_phonemes"] = phoneme_string(trial.labels)
      per.add(trial.day, greedy, trial.labels.tolist())
      for name, text in words.items():
        wer[name].add(trial.day, text.split(), metrics_lib.sentence_words(trial.sentence))
    records.append(rec)

  undecodable = sorted(set().union(*(d.undecodable for d in decoders.values())))
  result: dict[str, Any] = {
    "split": ic.split,
    "step": step,
    "n_trials": len(records),
    "labelled": labelled,
    "vocabulary": vocab_source,
    "n_words": len(lexicon.words),
    "missing_words": lexicon.missing,
    "undecodable_words": undecodable,
  }
  if labelled:
    result["greedy_per"] = per.rate()
    result["wer_no_lm"] = wer[NO_LM].rate()
    result["wer_lm"] = wer[WITH_LM].rate() if WITH_LM in wer else None
    result["per_day"] = per_day_rows(split, per, wer, config.data.sessions)
  if jax.process_index() == 0:
    result["files"] = write_outputs(out_dir, records, logits, result, lexicon, ic)
  return result


def per_day_rows(
  split: pipeline.DataSplit, per: metrics_lib.ErrorRate, wer: dict[str, metrics_lib.ErrorRate], sessions
) -> list[dict[str, Any]]:
  """One row per day of the split: session, day, trials, greedy PER, WER without and with the LM."""
  n_trials = {d: len(v) for d, v in split.day_indices().items()}
  per_d = per.per_day()
  wer_d = {name: e.per_day() for name, e in wer.items()}
  return [
    {
      "session": sessions[d],
      "day": d,
      "trials": n_trials[d],
      "greedy_per": per_d[d],
      "wer_no_lm": wer_d[NO_LM][d],
      "wer_lm": wer_d[WITH_LM][d] if WITH_LM in wer_d else None,
    }
    for d in sorted(per_d)
  ]


def write_outputs(
  out_dir: str,
  records: list[dict],
  logits: list[np.ndarray],
  result: dict,
  lexicon: lexicon_lm.Lexicon,
  ic: ml_collections.ConfigDict,
) -> dict[str, str]:
  """Writes the files listed in the module doc; returns name -> path."""
  os.makedirs(out_dir, exist_ok=True)
  files = {
    "csv": os.path.join(out_dir, "submission.csv"),
    "jsonl": os.path.join(out_dir, "trials.jsonl"),
    "metrics": os.path.join(out_dir, "metrics.json"),
  }
  with open(files["csv"], "w", newline="", encoding="utf-8") as f:
    w = csv.writer(f)
    w.writerow(["id", "text"])
    for r in records:
      w.writerow([r["id"], r["words_lm"] if r["words_lm"] is not None else r["words_no_lm"]])
  with open(files["jsonl"], "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  if ic.save_logits:
    files["logits"] = os.path.join(out_dir, "logits.npz")
    np.savez(
      files["logits"],
      **{f"{r['session']}/{t15.TRIAL_FMT.format(r['index_in_file'])}": lg for r, lg in zip(records, logits)},
    )
  if lexicon.missing:
    files["missing_words"] = os.path.join(out_dir, "missing_words.txt")
    with open(files["missing_words"], "w", encoding="utf-8") as f:
      f.write("\n".join(lexicon.missing) + "\n")
  if result["labelled"]:
    files["per_day"] = os.path.join(out_dir, "per_day.csv")
    cols = ["session", "day", "trials", "greedy_per", "wer_no_lm", "wer_lm"]
    with open(files["per_day"], "w", newline="", encoding="utf-8") as f:
      w = csv.DictWriter(f, fieldnames=cols)
      w.writeheader()
      for row in result["per_day"]:
        w.writerow({k: ("" if row[k] is None else row[k]) for k in cols})
    if ic.plot:
      files["plot"] = os.path.join(out_dir, "per_day.png")
      plot_per_day(files["plot"], result)
  with open(files["metrics"], "w", encoding="utf-8") as f:
    json.dump({k: v for k, v in result.items() if k != "files"}, f, indent=1)
  return files


def plot_per_day(path: str, result: dict) -> None:
  """Per-day greedy PER and WERs as lines over the day index (headless)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = result["per_day"]
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(max(6.0, 0.4 * len(rows) + 2), 4))
  ax.plot(x, [r["greedy_per"] for r in rows], "o-", label=f"greedy PER ({result['greedy_per']:.3f})")
  ax.plot(x, [r["wer_no_lm"] for r in rows], "s-", label=f"WER, lexicon, no LM ({result['wer_no_lm']:.3f})")
  if result["wer_lm"] is not None:
    ax.plot(x, [r["wer_lm"] for r in rows], "^-", label=f"WER, lexicon + LM ({result['wer_lm']:.3f})")
  ax.set_xticks(x, [r["session"] for r in rows], rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("error rate")
  ax.set_ylim(bottom=0)
  ax.set_title(f"{result['split']} split, step {result['step']}, {result['n_trials']} trials")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_metrics_table(result: dict) -> str:
  """The per-day table and the aggregate line of a labelled split, as printed at the end of mode=infer."""

  def fmt(v):
    return "     -" if v is None else f"{v:6.4f}"

  lines = [f"  {'session':<16} {'day':>3} {'trials':>6}  {'PER':>6}  {'WER':>6}  {'WER+LM':>6}"]
  for r in result["per_day"]:
    lines.append(
      f"  {r['session']:<16} {r['day']:>3} {r['trials']:>6}  {fmt(r['greedy_per'])}  "
      f"{fmt(r['wer_no_lm'])}  {fmt(r['wer_lm'])}"
    )
  lines.append(
    f"  {'all':<16} {'':>3} {result['n_trials']:>6}  {fmt(result['greedy_per'])}  "
    f"{fmt(result['wer_no_lm'])}  {fmt(result['wer_lm'])}"
  )
  return "\n".join(lines)
