"""The t15 layout: synthetic files, the reader's documented errors, the sampler and batching."""

import os
import shutil

import h5py
import numpy as np
import pytest
from conftest import load_hdf5_split, tiny_config

from b2t_jax.data import batching, pipeline, prepare, sampler
from b2t_jax.data.synthetic import SyntheticT15, make_synthetic_dataset
from b2t_jax.data.t15 import T15_SESSIONS, DataError


def test_synthetic_files_follow_the_t15_layout(synthetic_dir):
  assert sorted(os.listdir(synthetic_dir)) == list(T15_SESSIONS[:3])
  assert not os.path.exists(os.path.join(synthetic_dir, T15_SESSIONS[0], "data_val.hdf5"))  # as in the release
  with h5py.File(os.path.join(synthetic_dir, T15_SESSIONS[1], "data_train.hdf5")) as f:
    assert sorted(f.keys())[:2] == ["trial_0000", "trial_0001"] and len(f.keys()) == 16
    g = f["trial_0003"]
    assert set(g.keys()) == {"input_features", "seq_class_ids", "transcription"}
    assert g["input_features"].dtype == np.float32 and g["input_features"].shape[1] == 512
    assert set(g.attrs.keys()) == {"n_time_steps", "seq_len", "sentence_label", "session", "block_num", "trial_num"}
    assert g.attrs["n_time_steps"] == g["input_features"].shape[0]
    ids = g["seq_class_ids"][()]
    n = g.attrs["seq_len"]
    assert ids[:n].min() >= 1 and ids[:n].max() <= 40 and not ids[n:].any() and ids[n - 1] == 40
    text = "".join(chr(c) for c in g["transcription"][()] if c)
    assert text == g.attrs["sentence_label"] and g.attrs["session"] == T15_SESSIONS[1]
  with h5py.File(os.path.join(synthetic_dir, T15_SESSIONS[1], "data_test.hdf5")) as f:
    assert set(f["trial_0000"].keys()) == {"input_features"}
    assert "seq_len" not in f["trial_0000"].attrs


def test_synthetic_is_deterministic(tmp_path):
  a = make_synthetic_dataset(str(tmp_path / "a"), T15_SESSIONS, n_sessions=2, trials_per_session=4, seed=5)
  b = make_synthetic_dataset(str(tmp_path / "b"), T15_SESSIONS, n_sessions=2, trials_per_session=4, seed=5)
  sa, sb = load_hdf5_split(a, T15_SESSIONS, "train"), load_hdf5_split(b, T15_SESSIONS, "train")
  assert len(sa) == len(sb) == 8
  for x, y in zip(sa.trials, sb.trials):
    np.testing.assert_array_equal(x.features, y.features)
    np.testing.assert_array_equal(x.labels, y.labels)


def test_reader_loads_days_in_session_order(synthetic_dir):
  train = load_hdf5_split(synthetic_dir, T15_SESSIONS, "train", feature_pool=64)
  assert [t.day for t in train.trials] == [0] * 16 + [1] * 16 + [2] * 16
  assert train.trials[0].features.shape[1] == 8
  val = load_hdf5_split(synthetic_dir, T15_SESSIONS, "val")
  assert {t.day for t in val.trials} == {1, 2}
  test = load_hdf5_split(synthetic_dir, T15_SESSIONS, "test")
  assert all(t.labels is None and t.sentence is None for t in test.trials)


@pytest.fixture
def one_session(tmp_path, synthetic_dir):
  """A private copy of one session's train file to corrupt."""
  root = tmp_path / "root"
  (root / T15_SESSIONS[1]).mkdir(parents=True)
  path = root / T15_SESSIONS[1] / "data_train.hdf5"
  shutil.copy(os.path.join(synthetic_dir, T15_SESSIONS[1], "data_train.hdf5"), path)
  return str(root), str(path)


def _edit(path, fn):
  with h5py.File(path, "r+") as f:
    fn(f)


@pytest.mark.parametrize(
  "corrupt, message",
  [
    (lambda f: f["trial_0002"].__delitem__("input_features"), r"trial_0002: field 'input_features': missing dataset"),
    (lambda f: f["trial_0002"].attrs.__delitem__("seq_len"), r"trial_0002: field 'seq_len': missing attribute"),
    (lambda f: f["trial_0005"].attrs.__delitem__("n_time_steps"), r"trial_0005: field 'n_time_steps'"),
    (
      lambda f: (
        f["trial_0001"].__delitem__("input_features"),
        f["trial_0001"].create_dataset("input_features", data=np.zeros((50, 256), np.float32)),
      ),
      r"trial_0001: field 'input_features': shape \(50, 256\), expected \(n_time_steps, 512\)",
    ),
    (
      lambda f: f["trial_0004"]["input_features"].__setitem__((3, 7), np.nan),
      r"trial_0004: field 'input_features': 1 non-finite values.*first at bin 3",
    ),
    (lambda f: f["trial_0003"]["seq_class_ids"].__setitem__(0, 41), r"trial_0003: field 'seq_class_ids': ids must lie"),
    (lambda f: f.__delitem__("trial_0007"), r"not contiguous.*missing \['trial_0007'\]"),
    (lambda f: f["trial_0000"].attrs.__setitem__("session", "t15.2099.01.01"), r"trial_0000: field 'session'"),
  ],
)
def test_bad_files_raise_named_errors(one_session, corrupt, message):
  root, path = one_session
  _edit(path, corrupt)
  with pytest.raises(DataError, match=message) as e:
    load_hdf5_split(root, T15_SESSIONS, "train")
  if "contiguous" not in message:
    assert path in str(e.value)


def test_skip_mode_counts_bad_trials(one_session):
  root, path = one_session
  _edit(path, lambda f: f["trial_0004"]["input_features"].__setitem__((3, 7), np.inf))
  _edit(path, lambda f: f["trial_0006"]["input_features"].__setitem__((0, 0), np.nan))
  split = load_hdf5_split(root, T15_SESSIONS, "train", on_bad_trial="skip")
  assert len(split) == 14 and split.skipped == {"non_finite": 2}


def test_truncated_file_is_reported(one_session):
  root, path = one_session
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 3)
  with pytest.raises(DataError, match="cannot be opened as HDF5.*corrupt or truncated"):
    load_hdf5_split(root, T15_SESSIONS, "train")


def test_unknown_session_folder_and_missing_dir(one_session, tmp_path):
  root, _ = one_session
  os.mkdir(os.path.join(root, "t15.2030.01.01"))
  with pytest.raises(DataError, match=r"\['t15.2030.01.01'\] are not in config.data.sessions"):
    load_hdf5_split(root, T15_SESSIONS, "train")
  with pytest.raises(DataError, match="does not exist"):
    load_hdf5_split(str(tmp_path / "nowhere"), T15_SESSIONS, "train")


def test_label_longer_than_padding_is_an_error(synthetic_dir):
  with pytest.raises(DataError, match="exceed config.data.max_label_len=3"):
    load_hdf5_split(synthetic_dir, T15_SESSIONS, "train", max_label_len=3)


def test_sampler_is_a_pure_function_of_seed_and_step(synthetic_dir):
  days = load_hdf5_split(synthetic_dir, T15_SESSIONS, "train").day_indices()
  a = sampler.train_batch_indices(1, 7, days, 8, 2)
  assert np.array_equal(a, sampler.train_batch_indices(1, 7, days, 8, 2))
  assert not np.array_equal(a, sampler.train_batch_indices(1, 8, days, 8, 2))
  day_of = np.repeat(np.arange(3), 16)
  chosen = day_of[a]
  assert len(set(chosen[:4])) == 1 and len(set(chosen[4:])) == 1 and chosen[0] != chosen[4]
  with pytest.raises(ValueError, match="multiple of config.data.days_per_batch"):
    sampler.train_batch_indices(1, 0, days, 9, 2)
  with pytest.raises(ValueError, match="only 3 day"):
    sampler.train_batch_indices(1, 0, days, 8, 4)


def _t15_profile_lengths(n_days: int, per_day: int, seed: int = 0) -> tuple[dict[int, np.ndarray], np.ndarray]:
  """Trial lengths from the synthetic t15 length profile (~3-27 s), `per_day` trials on each of `n_days` days."""
  gen = SyntheticT15(seed, length_profile="t15")
  rng = np.random.default_rng(seed)
  lengths = gen.trial_lengths(rng, n_days * per_day)
  return {d: np.arange(d * per_day, (d + 1) * per_day) for d in range(n_days)}, lengths


def test_length_aware_batches_keep_the_days_and_cut_padding_on_the_t15_profile():
  days, lengths = _t15_profile_lengths(12, 180)
  buckets = tuple(range(128, 1537, 128)) + (2048, 3072)
  waste = {}
  for aware in (False, True):
    used = padded = 0
    for step in range(150):
      idx = sampler.train_batch_indices(1, step, days, 64, 4, lengths=lengths if aware else None)
      ref = sampler.train_batch_indices(1, step, days, 64, 4)
      # Same days in the same order as the reference recipe, 16 trials each.
      assert np.array_equal(idx // 180, ref // 180) and len(set(idx // 180)) == 4
      assert np.array_equal(idx, sampler.train_batch_indices(1, step, days, 64, 4, lengths=lengths if aware else None))
      used += lengths[idx].sum()
      padded += len(idx) * batching.bucket_length(int(lengths[idx].max()), buckets)
    waste[aware] = 1 - used / padded
  assert waste[False] > 0.35 and waste[True] < 0.15, waste


def test_length_aware_batches_draw_every_trial_without_a_length_preference():
  days, lengths = _t15_profile_lengths(4, 60, seed=1)
  draws = np.zeros(len(lengths))
  for step in range(3000):
    np.add.at(draws, sampler.train_batch_indices(2, step, days, 16, 2, lengths=lengths, window=0.1), 1)
  assert draws.min() > 0  # no trial is starved, the shortest and longest included
  longer = lengths > np.median(lengths)
  assert 0.85 < draws[longer].mean() / draws[~longer].mean() < 1.15
  assert draws.std() / draws.mean() < 0.4  # ~0.07 for uniform draws here, ~0.28 from windows a few trials wide


def test_eval_batches_are_per_day_and_cover_each_trial_once():
  days = {0: np.arange(0, 10), 3: np.arange(10, 13), 5: np.arange(13, 21)}
  chunks = sampler.eval_batch_indices(days, 8)
  assert [len(c) for c in chunks] == [8, 2, 3, 8]
  assert np.array_equal(np.concatenate(chunks), np.arange(21))


def test_batches_pad_to_buckets(prepared_dir):
  c = tiny_config(prepared_dir)
  assert c.data.feature_pool == 64
  c.data.update(time_buckets=(64, 256, 512), max_label_len=40, eval_batch_size=4)
  split = pipeline.open_split(prepare.find_dataset_dir(prepared_dir), c, "train", train=False)
  trials = split.read(np.flatnonzero(split.keep))
  idx = np.array([0, 5, 17])
  b = pipeline.eval_host_batch(split, c, idx)
  longest = max(trials[i].n_time_steps for i in idx)
  assert b["features"].shape == (4, 256 if longest > 64 else 64, 8)
  assert list(b["weight"]) == [1, 1, 1, 0] and b["day"][2] == 1
  np.testing.assert_array_equal(b["features"][1, : trials[5].n_time_steps], trials[5].features)
  assert not b["features"][1, trials[5].n_time_steps :].any()
  assert b["label_lens"][0] == len(trials[0].labels)
  with pytest.raises(ValueError, match="add a bucket"):
    pipeline.check_buckets(split, (32,))


def test_synthetic_sentences_follow_a_fixed_sparse_grammar():
  from b2t_jax.data.synthetic import SyntheticT15

  gen, same, other = SyntheticT15(seed=0), SyntheticT15(seed=0), SyntheticT15(seed=1)
  allowed = {(gen.words[a], gen.words[b]) for a in range(len(gen.words)) for b in gen.next_words[a]}
  assert len(allowed) == len(gen.words) * gen.successors
  assert all((a == b).all() for a, b in zip(gen.next_words, same.next_words))
  assert any((a != b).any() for a, b in zip(gen.next_words, other.next_words))
  rng = np.random.default_rng(1)
  sentences = [gen.sentence(rng, 6) for _ in range(200)]
  bigrams = [(s[i], s[i + 1]) for s in sentences for i in range(5)]
  assert set(bigrams) <= allowed and len(set(bigrams)) > len(allowed) // 3
  assert len({s[0] for s in sentences}) > len(gen.words) // 2  # first words spread over the lexicon
