"""mode=infer: a checkpoint -> per-trial logits of one split (batched, jitted) -> greedy phonemes and words.

python -m b2t_jax.main --config=CONFIG.py --workdir=DIR --config.mode=infer [--config.decode.lm_path=lm.arpa]

The orchestrator: it strings together the passes of b2t_jax/decoding (lexicon building, the beam search with its
n-best list, the rescorer) and writes what they give. Restores DIR/best (else DIR/checkpoints), runs
`config.infer.split` and writes into `config.infer.out_dir` (default DIR/infer_<split>):
- submission.csv  `id,text`: ids 0..N-1 in split order (session-list order, then file order; SPEC §5)
- trials.jsonl    one object per trial: id, session, day, block, trial, greedy phonemes, words without and with
                  the LM, the first pass's `nbest` [{words, acoustic, lm, total}], the true sentence and phonemes
                  when the split is labelled; with a rescorer also `words_lm_first_pass`, `rescored` and per
                  rescored n-best entry `rescore_lm` (ln P) and `rescore_total`
- per_day.csv     per-day greedy PER and WERs (labelled splits), per_day.png the same as a plot
- skipped_trials.json  the split's skip counts (the workdir itself is only read: it may be read-only)
- metrics.json    the aggregate numbers (PER, WERs, OOV rate, vocabulary counts); logits.npz (with
                  infer.save_logits) the raw (P, 41) logits per trial (diphone targets: the marginal phoneme
                  log-probabilities; an ensemble: its merged log-probabilities)
- missing_words.txt  words of the decoding vocabulary without a pronunciation (when there are any); words that
                  lost every trie slot to more probable homophones are listed in metrics.json
- mismatched_transcripts.txt  training trials whose word count differs from their labels' word boundaries
The text of the CSV is the LM decoding (rescored when a rescorer is set) when `config.decode.lm_path` or a
rescorer is set, else the lexicon-only decoding. A vocabulary with no pronunciation at all leaves the word fields
empty (metrics.json says why) but never stops the greedy phonemes and PER.
"""

from __future__ import annotations

import csv
import dataclasses
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
from b2t_jax.decoding import beam_search, rescore
from b2t_jax.decoding import lexicon as lexicon_lib


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


# This machine's launch settings: a merged workdir is restored with these, not with the ones it recorded (all are
# safe to change on a workdir).
LAUNCH_FIELDS = ("mesh_shape", "logical_axis_rules", "data.eval_batch_size", "data.prefetch", "data.prefetch_workers")


def member_logits(
  exp: experiment.Experiment, params: Any, member: int, split: pipeline.DataSplit
) -> dict[int, np.ndarray]:
  """`split_logits` of member `member` alone of an ensemble's stacked `params` (config.infer.member)."""
  k = exp.n_models
  if k == 1 and member == 0:
    return split_logits(exp, params, split)
  if not 0 <= member < k:
    raise ValueError(f"config.infer.member={member}: this workdir holds {k} member(s) (config.train.n_models)")
  one = experiment.Experiment(workdir_lib.with_overrides(exp.config, {"train.n_models": 1}), mesh=exp.mesh)
  return split_logits(one, jax.device_put(jax.tree.map(lambda a: a[member], params), one.param_shardings), split)


def ensemble_logits(
  config: ml_collections.ConfigDict, workdir: str, split: pipeline.DataSplit
) -> tuple[dict[int, np.ndarray], int]:
  """Record index -> (P, 41) scores of `split` from the workdir's checkpoint, merged with those of every workdir
  of `config.infer.ensemble_workdirs` (each restored with its own recorded config and this machine's
  `LAUNCH_FIELDS`) by the mean log-probability of all their members (a K-member workdir counts K times). Workdirs
  of different `model.targets` merge: a diphone model contributes its marginal phoneme log-probabilities.
  Returns (scores, the main checkpoint's step)."""
  flat = workdir_lib.flat_config(config)
  launch = {k: flat[k] for k in LAUNCH_FIELDS}
  sources = [(config, workdir)] + [
    (workdir_lib.recorded_config(w, launch), w) for w in config.infer.ensemble_workdirs.split(",") if w.strip()
  ]
  total: dict[int, np.ndarray] = {}
  members, step = 0, 0
  for i, (cfg, wd) in enumerate(sources):
    if i:
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


@dataclasses.dataclass
class SplitScores:
  """One split's per-trial scores (record order) and true words, for the decoding tools."""

  dataset_dir: str
  step: int
  logits: list[np.ndarray]  # (P_i, 41) per kept trial
  refs: list[list[str]]  # the normalised true words per trial (empty for the test split)
  days: list[int]


def split_scores(config: ml_collections.ConfigDict, workdir: str, split_name: str, max_trials: int = 0) -> SplitScores:
  """The checkpoint's (or ensemble's) scores of `split_name` and its true words (the first `max_trials` trials
  when > 0), without decoding; the workdir is only read (skip counts go to a temporary folder)."""
  import tempfile

  with tempfile.TemporaryDirectory() as report:
    split = experiment.open_data(config, workdir, (split_name,), report_dir=report)[split_name]
  record_logits, step = ensemble_logits(config, workdir, split)
  logits, refs, days = [], [], []
  for record, trial in split_trials(split, config.data.eval_batch_size):
    if max_trials and len(logits) == max_trials:
      break
    logits.append(record_logits.pop(record))
    refs.append(metrics_lib.sentence_words(trial.sentence) if trial.sentence is not None else [])
    days.append(trial.day)
  return SplitScores(split.dataset_dir, step, logits, refs, days)


@dataclasses.dataclass
class WordDecoding:
  """The passes that turn a trial's scores into words: the lexicon-only beam, the first pass whose n-best list is
  kept (the LM beam when `config.decode.lm_path` is set, else the lexicon-only one) and the optional rescorer."""

  lexicon: lexicon_lib.Lexicon
  vocabulary: str  # where the word list came from
  no_lm: beam_search.LexiconLMDecoder
  first_pass: beam_search.LexiconLMDecoder
  has_lm: bool
  scorer: rescore.SentenceScorer | None
  learned: lexicon_lib.LearnedPronunciations | None

  @property
  def decodable(self) -> set[str]:
    """The words some beam can emit (in the lexicon, with a trie slot)."""
    lost = set(self.no_lm.undecodable) | set(self.first_pass.undecodable)
    return set(self.lexicon.words) - lost


def training_transcripts(dataset_dir: str) -> list[tuple[str, str, np.ndarray]] | None:
  """(trial, sentence, phonemes) of the training split, or None (logged) when the dataset has none."""
  try:
    return list(lexicon_lib.dataset_transcripts(dataset_dir, "train"))
  except t15.DataError as e:
    logging.warning("no labelled training trials to learn pronunciations and the vocabulary from: %s", e)
    return None


def build_word_decoding(config: ml_collections.ConfigDict, dataset_dir: str) -> WordDecoding:
  """The lexicon (CMUdict, `decode.lexicon_path`, pronunciations learned from the training transcripts of the
  prepared `dataset_dir`), both beams and the rescorer of `config.decode`. Raises `VocabularyError` when no word
  can be spelled, FileNotFoundError for a missing LM."""
  dc = config.decode
  for path, field in ((dc.lm_path, "lm_path"), (dc.rescore.path if dc.rescore.kind == "ngram" else "", "rescore.path")):
    if path and not os.path.exists(path):
      raise FileNotFoundError(
        f"config.decode.{field}={path!r} does not exist; build one with tools/build_lm.py (or leave lm_path empty "
        "for lexicon-only decoding)"
      )
  transcripts = training_transcripts(dataset_dir)
  learned = lexicon_lib.learn_pronunciations(transcripts) if transcripts is not None else None
  sentences = [t[1] for t in transcripts] if transcripts is not None else None
  vocab, source = lexicon_lib.decoding_vocabulary(dc, sentences)
  extra = lexicon_lib.read_lexicon_file(dc.lexicon_path) if dc.lexicon_path else None
  lexicon = lexicon_lib.build_lexicon(vocab, extra, learned, variants=dc.lexicon_variants, source=source)
  no_lm = beam_search.LexiconLMDecoder.from_config(lexicon, dc, use_lm=False)
  first = beam_search.LexiconLMDecoder.from_config(lexicon, dc, use_lm=True) if dc.lm_path else no_lm
  scorer = rescore.make_scorer(dc.rescore, lexicon.words)
  logging.info(
    "decoding vocabulary: %d words from %s (%d spelled by the training trials, %d without pronunciation)",
    len(lexicon.words),
    source,
    len(lexicon.learned),
    len(lexicon.missing),
  )
  return WordDecoding(lexicon, source, no_lm, first, bool(dc.lm_path), scorer, learned)


def phoneme_string(ids) -> str:
  return " ".join(vocab.PHONEMES[i].strip() for i in ids)


def decode_words(
  words: WordDecoding, records: list[dict], logits: list[np.ndarray], decode_config: ml_collections.ConfigDict
) -> None:
  """Adds the words of every trial to its record: `words_no_lm`, `words_lm` (the first pass with an LM, after
  rescoring when there is a rescorer) and the first pass's `nbest`; with a rescorer also `words_lm_first_pass`,
  `rescored` and, per rescored n-best entry, `rescore_lm` (ln P) and `rescore_total`."""
  nbests = []
  for rec, lg in zip(
    records, tqdm(logits, desc="decoding", unit="trial", disable=jax.process_index() > 0), strict=True
  ):
    nbest = words.first_pass.decode_nbest(lg, decode_config.nbest)
    best = nbest[0].text if nbest else ""
    rec["words_no_lm"] = words.no_lm.decode(lg) if words.has_lm else best
    rec["words_lm"] = best if words.has_lm else None
    rec["nbest"] = [h.as_dict() for h in nbest]
    nbests.append(nbest)
  if words.scorer is None:
    return
  rc = decode_config.rescore
  for rec, nbest, r in zip(
    records,
    nbests,
    rescore.rescore(nbests, words.scorer, weight=rc.weight, word_bonus=rc.word_bonus, gate_margin=rc.gate_margin),
  ):
    rec["words_lm_first_pass"] = nbest[0].text if nbest else ""
    rec["words_lm"] = nbest[r.choice].text if nbest else ""
    rec["rescored"] = r.rescored
    if r.rescored:
      for entry, lp, total in zip(rec["nbest"], r.log_probs, r.totals):
        entry.update(rescore_lm=lp, rescore_total=total)


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
  # Words first: a missing LM stops before the forward pass; a vocabulary without pronunciations does not stop the
  # greedy phonemes and PER from being written.
  words, word_error = None, None
  try:
    words = build_word_decoding(config, split.dataset_dir)
  except lexicon_lib.VocabularyError as e:
    word_error = str(e)
    logging.error("no word decoding (greedy phonemes and PER are still written): %s", e)
  record_logits, step = ensemble_logits(config, workdir, split)
  labelled = ic.split != "test"

  per = metrics_lib.ErrorRate()
  records, logits, refs = [], [], []
  for i, (record, trial) in enumerate(split_trials(split, config.data.eval_batch_size)):
    lg = record_logits.pop(record)
    logits.append(lg)
    greedy = metrics_lib.greedy_decode(np.argmax(lg, axis=-1), lg.shape[0])
    rec = {
      "id": i,
      "session": trial.session,
      "day": trial.day,
      "block": trial.block,
      "trial": trial.trial,
      "index_in_file": trial.index_in_file,
      "greedy_phonemes": phoneme_string(greedy),
      "words_no_lm": None,
      "words_lm": None,
    }
    if labelled:
      rec["true_sentence"] = trial.sentence
      rec["true_phonemes"] = phoneme_string(trial.labels)
      per.add(trial.day, greedy, trial.labels.tolist())
      refs.append(metrics_lib.sentence_words(trial.sentence))
    records.append(rec)
  if words is not None:
    decode_words(words, records, logits, config.decode)

  result: dict[str, Any] = {
    "split": ic.split,
    "step": step,
    "n_trials": len(records),
    "labelled": labelled,
    "word_decoding_error": word_error,
  }
  if words is not None:
    result.update(
      vocabulary=words.vocabulary,
      n_words=len(words.lexicon.words),
      missing_words=words.lexicon.missing,
      undecodable_words=sorted(set(words.no_lm.undecodable) | set(words.first_pass.undecodable)),
      learned_words=len(words.lexicon.learned),
      mismatched_transcripts=len(words.learned.mismatched) if words.learned else 0,
    )
    if words.scorer is not None:
      result["rescore"] = config.decode.rescore.kind
      result["rescored_fraction"] = float(np.mean([r["rescored"] for r in records])) if records else 0.0
  if labelled:
    wer = word_error_rates(records, refs, words)
    result["greedy_per"] = per.rate()
    result["oov_rate"] = oov_rate(refs, words.decodable if words is not None else set())
    result.update({name: (e.rate() if e is not None else None) for name, e in wer.items()})
    result["per_day"] = per_day_rows(split, per, wer, config.data.sessions)
  if jax.process_index() == 0:
    result["files"] = write_outputs(out_dir, records, logits, result, words, ic)
  return result


WER_COLUMNS = {"wer_no_lm": "words_no_lm", "wer_lm": "words_lm", "wer_lm_first_pass": "words_lm_first_pass"}


def word_error_rates(
  records: list[dict], refs: list[list[str]], words: WordDecoding | None
) -> dict[str, metrics_lib.ErrorRate | None]:
  """WER of every word column the records hold (None where there is no such decoding)."""
  out: dict[str, metrics_lib.ErrorRate | None] = {}
  for name, field in WER_COLUMNS.items():
    present = records and records[0].get(field) is not None
    if name == "wer_lm_first_pass" and not present:
      continue  # only with a rescorer
    if not present:
      out[name] = None
      continue
    e = metrics_lib.ErrorRate()
    for rec, ref in zip(records, refs):
      e.add(rec["day"], rec[field].split(), ref)
    out[name] = e
  return out


def oov_rate(refs: list[list[str]], decodable: set[str]) -> float:
  """Share of the reference words that no beam can emit (not in the lexicon, or without a trie slot)."""
  total = sum(len(r) for r in refs)
  return sum(w not in decodable for r in refs for w in r) / max(total, 1)


def per_day_rows(
  split: pipeline.DataSplit, per: metrics_lib.ErrorRate, wer: dict[str, metrics_lib.ErrorRate | None], sessions
) -> list[dict[str, Any]]:
  """One row per day of the split: session, day, trials, greedy PER, and each WER (no LM, LM, first pass)."""
  n_trials = {d: len(v) for d, v in split.day_indices().items()}
  per_d = per.per_day()
  wer_d = {name: (e.per_day() if e is not None else None) for name, e in wer.items()}
  return [
    {
      "session": sessions[d],
      "day": d,
      "trials": n_trials[d],
      "greedy_per": per_d[d],
      **{name: (v[d] if v is not None else None) for name, v in wer_d.items()},
    }
    for d in sorted(per_d)
  ]


def write_outputs(
  out_dir: str,
  records: list[dict],
  logits: list[np.ndarray],
  result: dict,
  words: WordDecoding | None,
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
      w.writerow([r["id"], r["words_lm"] if r["words_lm"] is not None else (r["words_no_lm"] or "")])
  with open(files["jsonl"], "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  if ic.save_logits:
    files["logits"] = os.path.join(out_dir, "logits.npz")
    np.savez(
      files["logits"],
      **{f"{r['session']}/{t15.TRIAL_FMT.format(r['index_in_file'])}": lg for r, lg in zip(records, logits)},
    )
  if words is not None and words.lexicon.missing:
    files["missing_words"] = os.path.join(out_dir, "missing_words.txt")
    with open(files["missing_words"], "w", encoding="utf-8") as f:
      f.write("\n".join(words.lexicon.missing) + "\n")
  if words is not None and words.learned is not None and words.learned.mismatched:
    files["mismatched_transcripts"] = os.path.join(out_dir, "mismatched_transcripts.txt")
    with open(files["mismatched_transcripts"], "w", encoding="utf-8") as f:
      f.write("".join(f"{where}\t{why}\n" for where, why in words.learned.mismatched))
  if result["labelled"]:
    files["per_day"] = os.path.join(out_dir, "per_day.csv")
    cols = list(result["per_day"][0]) if result["per_day"] else ["session", "day", "trials", "greedy_per"]
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
  for name, style, label in (
    ("wer_no_lm", "s-", "WER, lexicon, no LM"),
    ("wer_lm_first_pass", "v--", "WER, first pass"),
    ("wer_lm", "^-", "WER, lexicon + LM" + (" + rescoring" if result.get("rescore") else "")),
  ):
    if result.get(name) is not None:
      ax.plot(x, [r[name] for r in rows], style, label=f"{label} ({result[name]:.3f})")
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
  """The per-day table and the aggregate line of a labelled split, as printed at the end of mode=infer (with a
  rescorer, WER+LM is the rescored result and 1st pass the beam's)."""

  def fmt(v):
    return "     -" if v is None else f"{v:6.4f}"

  cols = [("PER", "greedy_per"), ("WER", "wer_no_lm"), ("WER+LM", "wer_lm")]
  if "wer_lm_first_pass" in result:
    cols.insert(2, ("1st pass", "wer_lm_first_pass"))
  lines = [f"  {'session':<16} {'day':>3} {'trials':>6}" + "".join(f"  {c:>8}" for c, _ in cols)]
  for r in result["per_day"]:
    lines.append(f"  {r['session']:<16} {r['day']:>3} {r['trials']:>6}" + "".join(f"    {fmt(r[k])}" for _, k in cols))
  lines.append(f"  {'all':<16} {'':>3} {result['n_trials']:>6}" + "".join(f"    {fmt(result[k])}" for _, k in cols))
  return "\n".join(lines)


def metrics_line(result: dict) -> str:
  """The last line mode=infer prints on a labelled split: `greedy_per=… wer_no_lm=… wer_lm=…` (n/a where there
  is no such decoding), then the first pass's WER and the OOV rate."""

  def fmt(v):
    return "n/a" if v is None else f"{v:.4f}"

  keys = ["greedy_per", "wer_no_lm", "wer_lm"] + (["wer_lm_first_pass"] if "wer_lm_first_pass" in result else [])
  return " ".join(f"{k}={fmt(result.get(k))}" for k in [*keys, "oov_rate"])
