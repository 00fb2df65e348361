"""mode=infer end to end on a tiny untrained model: the files, their ids, columns and rows (no accuracy claims)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY_SIZES, as_flags, cpu_env, load_hdf5_split

from b2t_jax import checkpoint as ckpt_lib
from b2t_jax import evaluation, experiment, vocab
from b2t_jax import metrics as metrics_lib
from b2t_jax.data import pipeline, t15
from b2t_jax.decoding import ngram
from b2t_jax.patching import n_patches


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_dir, prepared_dir):
  """A workdir holding a tiny model's checkpoint (initial weights, saved through the training code's
  Checkpoints with the val PER its eval_step measured; compiling a train step would triple the test time),
  and a bigram LM built from the training sentences."""
  from conftest import tiny_config

  work = str(tmp_path_factory.mktemp("infer_work"))
  config = tiny_config(prepared_dir)
  exp = experiment.Experiment(config)
  state = exp.init_state()
  val = experiment.open_data(config, work, ("val",))["val"]
  evaluated = evaluation.evaluate(exp, state.params, val, pipeline.eval_plan(val, config.data.eval_batch_size))
  ckpts = ckpt_lib.Checkpoints(work)
  ckpts.maybe_save_best(state, evaluated["val_per"], evaluated["val_loss"])
  ckpts.wait()
  ckpts.close()
  lm = os.path.join(work, "lm.arpa")
  counts = ngram.count_ngrams((s.split() for s in ngram.dataset_sentences(synthetic_dir)), 2)
  probs, backoffs, _ = ngram.kneser_ney(counts)
  ngram.write_arpa(lm, probs, backoffs)
  return work, lm


def _rows(path):
  with open(path, newline="") as f:
    return list(csv.reader(f))


def test_infer_val_from_the_command_line(trained, synthetic_dir, prepared_dir):
  work, lm = trained
  p = subprocess.run(
    [
      sys.executable,
      "-m",
      "b2t_jax.main",
      "--config=configs/demo.py",
      f"--workdir={work}",
      f"--config.data.data_dir={prepared_dir}",
      *as_flags(TINY_SIZES),
      "--config.mode=infer",
      f"--config.decode.lm_path={lm}",
      "--config.infer.save_logits=True",
      "--config.decode.beam_size=20",
      "--config.decode.nbest=3",
      "--config.decode.rescore.kind=ngram",
      f"--config.decode.rescore.path={lm}",
      # a negative LM weight prefers the n-best entries the first pass's LM liked least: whatever the tiny model
      # emits (one word per trial, say), the second pass must then change some choices
      "--config.decode.rescore.weight=-5",
      "--config.decode.rescore.word_bonus=10",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=cpu_env(8),
  )
  assert p.returncode == 0, p.stderr[-3000:]
  last = p.stdout.strip().splitlines()[-1]
  assert last.startswith("greedy_per=") and " wer_no_lm=" in last and " wer_lm=" in last, p.stdout[-1000:]
  assert " wer_lm_first_pass=" in last and " oov_rate=" in last
  assert "WER+LM" in p.stdout

  val = load_hdf5_split(synthetic_dir, t15.T15_SESSIONS, "val", feature_pool=TINY_SIZES["data.feature_pool"])
  out = os.path.join(work, "infer_val")
  rows = _rows(os.path.join(out, "submission.csv"))
  assert rows[0] == ["id", "text"] and [int(r[0]) for r in rows[1:]] == list(range(len(val)))

  with open(os.path.join(out, "trials.jsonl")) as f:
    recs = [json.loads(line) for line in f]
  assert len(recs) == len(val)
  for rec, trial, row in zip(recs, val.trials, rows[1:]):
    assert (rec["session"], rec["day"], rec["block"], rec["trial"]) == (
      trial.session,
      trial.day,
      trial.block,
      trial.trial,
    )
    assert rec["true_sentence"] == trial.sentence
    assert rec["true_phonemes"].split() == [vocab.PHONEMES[i].strip() for i in trial.labels]
    assert set(rec["greedy_phonemes"].split()) <= {p.strip() for p in vocab.PHONEMES[1:]}
    assert row[1] == rec["words_lm"] and isinstance(rec["words_no_lm"], str)
    # the first pass's n-best list, rescored by -5 ln P of the same LM (natural log of its log10 score)
    nbest = rec["nbest"]
    assert 1 <= len(nbest) <= 3 and nbest[0]["words"] == rec["words_lm_first_pass"] and rec["rescored"]
    assert [h["total"] for h in nbest] == sorted((h["total"] for h in nbest), reverse=True)
    for h in nbest:
      assert h["rescore_lm"] == pytest.approx(np.log(10) * h["lm"], abs=1e-3)
      assert h["rescore_total"] == pytest.approx(
        h["total"] - 5 * h["rescore_lm"] + 10 * len(h["words"].split()), abs=1e-3
      )
    assert rec["words_lm"] == max(nbest, key=lambda h: h["rescore_total"])["words"]
  assert any(rec["words_lm"] != rec["words_lm_first_pass"] for rec in recs)

  logits = np.load(os.path.join(out, "logits.npz"))
  assert sorted(logits.files) == sorted(f"{t.session}/trial_{t.index_in_file:04d}" for t in val.trials)
  t0 = val.trials[0]
  assert logits[f"{t0.session}/trial_0000"].shape == (int(n_patches(np.array(t0.n_time_steps), 14, 4)), 41)

  per_day = _rows(os.path.join(out, "per_day.csv"))
  assert per_day[0] == ["session", "day", "trials", "greedy_per", "wer_no_lm", "wer_lm", "wer_lm_first_pass"]
  assert [int(r[1]) for r in per_day[1:]] == sorted({t.day for t in val.trials})
  assert sum(int(r[2]) for r in per_day[1:]) == len(val)
  with open(os.path.join(out, "per_day.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  metrics = json.load(open(os.path.join(out, "metrics.json")))
  assert metrics["n_trials"] == len(val) and metrics["step"] == 0
  assert metrics["rescore"] == "ngram" and metrics["rescored_fraction"] == 1.0
  # the vocabulary is the LM's, i.e. the training words: the OOV rate is the share of val words never trained on
  train_words = {w for s in ngram.dataset_sentences(synthetic_dir) for w in metrics_lib.sentence_words(s)}
  refs = [metrics_lib.sentence_words(t.sentence) for t in val.trials]
  oov = sum(w not in train_words for r in refs for w in r) / sum(len(r) for r in refs)
  assert metrics["oov_rate"] == pytest.approx(oov) and f"oov_rate={oov:.4f}" in last

  # greedy PER of infer (its own forward pass) equals the val PER that eval_step measured for the best
  # checkpoint, which infer restored
  ckpts = ckpt_lib.Checkpoints(work)
  assert metrics["greedy_per"] == pytest.approx(ckpts.best_key[0], abs=1e-9)
  ckpts.close()


def test_infer_test_split_writes_the_competition_csv(trained, synthetic_dir, prepared_dir, tmp_path):
  from conftest import tiny_config

  from b2t_jax import infer

  work, _ = trained
  config = tiny_config(prepared_dir)
  config.infer.split = "test"
  config.infer.out_dir = str(tmp_path / "out")
  config.decode.beam_size = 20
  result = infer.run_inference(config, work)
  test = load_hdf5_split(synthetic_dir, t15.T15_SESSIONS, "test", feature_pool=TINY_SIZES["data.feature_pool"])
  assert not result["labelled"] and result["n_trials"] == len(test)
  rows = _rows(tmp_path / "out" / "submission.csv")
  assert rows[0] == ["id", "text"] and [int(r[0]) for r in rows[1:]] == list(range(len(test)))
  # no LM given: the CSV holds the lexicon-only decoding; no labels, so no tables
  recs = [json.loads(line) for line in open(tmp_path / "out" / "trials.jsonl")]
  assert [r[1] for r in rows[1:]] == [r["words_no_lm"] for r in recs]
  assert all(r["words_lm"] is None and "true_sentence" not in r for r in recs)
  assert [r["session"] for r in recs] == [t.session for t in test.trials]
  assert sorted(os.listdir(tmp_path / "out")) == [
    "metrics.json",
    "skipped_trials.json",
    "submission.csv",
    "trials.jsonl",
  ]  # the skip report too: the workdir is only read


def test_training_sentences_read_the_same_from_hdf5_and_the_prepared_dataset(synthetic_dir, prepared_dir):
  hdf5 = list(ngram.dataset_sentences(synthetic_dir))
  assert len(hdf5) == 3 * 16 and list(ngram.dataset_sentences(prepared_dir)) == hdf5


def test_infer_refuses_a_test_split_with_skipped_trials(tmp_path, synthetic_dir):
  """Competition ids are positions among all test trials: one skipped trial would shift every later id."""
  import shutil

  import h5py
  from conftest import tiny_config

  from b2t_jax.data import tfds_b2t

  root = tmp_path / "tree"
  shutil.copytree(synthetic_dir, root)
  with h5py.File(root / t15.T15_SESSIONS[1] / "data_test.hdf5", "r+") as f:
    f["trial_0001"]["input_features"][2, 3] = np.nan
  tfds_b2t.prepare(str(root), str(tmp_path / "tfds"), on_bad_trial="skip")
  from b2t_jax import infer

  config = tiny_config(str(tmp_path / "tfds"))
  config.data.on_bad_trial = "skip"
  config.infer.split = "test"
  with pytest.raises(t15.DataError, match=r"test split had trials skipped \({'prepare:non_finite': 1}\)"):
    infer.run_inference(config, str(tmp_path / "work"))


def test_infer_counts_oov_words_and_keeps_per_when_no_word_can_be_spelled(
  trained, synthetic_dir, prepared_dir, tmp_path
):
  """A vocabulary file missing some of the val words: their share of the val words is the OOV rate. One whose
  words no source can spell: no word decoding, yet the greedy phonemes and PER are written."""
  from conftest import tiny_config

  from b2t_jax import infer

  work, _ = trained
  val = load_hdf5_split(synthetic_dir, t15.T15_SESSIONS, "val", feature_pool=TINY_SIZES["data.feature_pool"])
  refs = [metrics_lib.sentence_words(t.sentence) for t in val.trials]
  known = sorted({w for r in refs for w in r})[::2]
  vocab_file = tmp_path / "words.txt"
  vocab_file.write_text("\n".join([*known, "qzxvbn"]) + "\n")
  config = tiny_config(prepared_dir)
  config.infer.out_dir = str(tmp_path / "some")
  config.decode.beam_size = 20
  config.decode.vocabulary = str(vocab_file)
  result = infer.run_inference(config, work)
  expect = sum(w not in known for r in refs for w in r) / sum(len(r) for r in refs)
  assert 0 < expect < 1 and result["oov_rate"] == pytest.approx(expect)
  assert result["missing_words"] == ["qzxvbn"] and (tmp_path / "some" / "missing_words.txt").read_text() == "qzxvbn\n"
  # the decoder can only emit words of the vocabulary
  recs = [json.loads(line) for line in open(tmp_path / "some" / "trials.jsonl")]
  assert {w for r in recs for w in r["words_no_lm"].split()} <= set(known)

  vocab_file.write_text("qzxvbn\nflurpt\n")
  config.infer.out_dir = str(tmp_path / "none")
  result = infer.run_inference(config, work)
  assert "no word of the" in result["word_decoding_error"] and result["oov_rate"] == 1.0
  assert result["wer_no_lm"] is None and result["wer_lm"] is None and 0 < result["greedy_per"] <= 1.5
  recs = [json.loads(line) for line in open(tmp_path / "none" / "trials.jsonl")]
  assert len(recs) == len(val) and all(r["greedy_phonemes"] is not None and r["words_no_lm"] is None for r in recs)
  assert "greedy_per=" in infer.metrics_line(result) and "wer_no_lm=n/a" in infer.metrics_line(result)
  assert [r[1] for r in _rows(tmp_path / "none" / "submission.csv")[1:]] == [""] * len(val)


def test_split_scores_hold_the_val_trials_in_order_for_the_decoding_tools(trained, synthetic_dir, prepared_dir):
  """What tools/tune_decode.py and benchmark_decode.py decode: the first N val trials' logits (as mode=infer's
  forward pass gives them) and true words, in split order; the workdir is not written to."""
  from conftest import tiny_config

  from b2t_jax import infer

  work, _ = trained
  config = tiny_config(prepared_dir)
  before = sorted(os.listdir(work))
  scores = infer.split_scores(config, work, "val", max_trials=5)
  assert sorted(os.listdir(work)) == before
  val = load_hdf5_split(synthetic_dir, t15.T15_SESSIONS, "val", feature_pool=TINY_SIZES["data.feature_pool"])
  assert scores.refs == [metrics_lib.sentence_words(t.sentence) for t in val.trials[:5]]
  assert scores.days == [t.day for t in val.trials[:5]] and scores.step == 0
  split = experiment.open_data(config, str(os.path.join(work, "..", "scores_check")), ("val",))["val"]
  full, _ = infer.ensemble_logits(config, work, split)
  for got, record in zip(scores.logits, np.flatnonzero(split.keep)[:5]):
    np.testing.assert_array_equal(got, full[int(record)])
    assert got.shape[1] == 41
