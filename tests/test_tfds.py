"""The TFDS (ArrayRecord) path: builder round trip, stateless batches across restarts, per-process shards,
prefetch, the HDF5 cache, and every bad input raising or being skipped with its count."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import h5py
import numpy as np
import pytest
from conftest import load_hdf5_split, tiny_config

from b2t_jax.data import batching, pipeline, prepare, tfds_b2t
from b2t_jax.data.t15 import T15_SESSIONS, DataError


def _open(prepared_dir, split="train", train=True, **data):
  c = tiny_config(prepared_dir)
  c.data.feature_pool = 1
  c.data.update(data)
  return pipeline.open_split(prepare.find_dataset_dir(prepared_dir), c, split, train=train), c


def test_round_trip_hdf5_to_tfds_to_batch_is_bit_exact(prepared_dir, synthetic_dir):
  split, c = _open(prepared_dir)
  hdf5 = load_hdf5_split(synthetic_dir, T15_SESSIONS, "train").trials
  assert len(split) == len(hdf5) == 48
  assert list(split.day) == [t.day for t in hdf5] and list(split.n_time_steps) == [t.n_time_steps for t in hdf5]
  batch = pipeline.train_host_batch(split, c, 3)
  idx = pipeline.sampler.train_batch_indices(c.data.seed, 3, split.days, c.data.batch_size, c.data.days_per_batch)
  for r, i in enumerate(idx):
    t = hdf5[i]
    with h5py.File(os.path.join(synthetic_dir, t.session, "data_train.hdf5")) as f:
      g = f[f"trial_{t.index_in_file:04d}"]
      raw = g["input_features"][()]
      assert batch["features"][r, : len(raw)].tobytes() == raw.tobytes()  # the file's bytes
      assert not batch["features"][r, len(raw) :].any()
      n = g.attrs["seq_len"]
      np.testing.assert_array_equal(batch["labels"][r, :n], g["seq_class_ids"][:n])
      assert batch["label_lens"][r] == n and batch["n_time_steps"][r] == len(raw)
    assert batch["day"][r] == t.day
  rec = split.read([5])[0]
  assert rec.sentence == hdf5[5].sentence == rec.transcription and rec.block == hdf5[5].block
  test, _ = _open(prepared_dir, "test", train=False)
  assert len(test) == 8 and test.read([0])[0].labels is None


def test_length_aware_batches_are_drawn_with_the_records_lengths(prepared_dir):
  split, c = _open(prepared_dir, feature_pool=64, length_aware=True, length_window=0.2)
  d = c.data
  for step in range(3):
    idx = pipeline.sampler.train_batch_indices(
      d.seed, step, split.days, d.batch_size, d.days_per_batch, lengths=split.n_time_steps, window=0.2
    )
    batch = pipeline.train_host_batch(split, c, step)
    np.testing.assert_array_equal(batch["n_time_steps"], split.n_time_steps[idx])
    np.testing.assert_array_equal(batch["day"], split.day[idx])


def test_batches_are_a_pure_function_of_step_across_a_restart(prepared_dir):
  split, c = _open(prepared_dir, feature_pool=64)
  straight = [b for _, b in batching.Prefetcher(lambda k: pipeline.train_host_batch(split, c, k), range(0, 6), 2)]
  reopened, _ = _open(prepared_dir, feature_pool=64)  # a new process after a restart
  with batching.Prefetcher(lambda k: pipeline.train_host_batch(reopened, c, k), range(3, 6), 2) as it:
    resumed = list(it)
  assert [k for k, _ in resumed] == [3, 4, 5]
  for (_, a), b in zip(resumed, straight[3:]):
    for key in a:
      assert a[key].tobytes() == b[key].tobytes()
  assert straight[0]["features"].tobytes() != straight[1]["features"].tobytes()


def test_two_hosts_read_disjoint_rows_whose_union_is_the_global_batch(prepared_dir, monkeypatch):
  split, c = _open(prepared_dir, feature_pool=64)
  read = []
  original = pipeline.DataSplit.read
  monkeypatch.setattr(pipeline.DataSplit, "read", lambda self, idx: read.append(list(idx)) or original(self, idx))
  for step in range(3):
    read.clear()
    whole = pipeline.train_host_batch(split, c, step, process_index=0, process_count=1)
    parts = [pipeline.train_host_batch(split, c, step, process_index=p, process_count=2) for p in range(2)]
    assert len(read[1]) == len(read[2]) == 4  # each host decodes only its own 4 of the 8 rows
    assert parts[0]["features"].shape == parts[1]["features"].shape  # one bucket for the global batch
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([parts[0][key], parts[1][key]]), whole[key])
  # Eval: the per-day plan covers every val trial exactly once, the hosts' rows together hold each once.
  val, c = _open(prepared_dir, "val", train=False, feature_pool=64)
  plan = pipeline.eval_plan(val, c.data.eval_batch_size)
  assert sorted(np.concatenate(plan)) == list(range(len(val)))
  seen = []
  for idx in plan:
    for p in range(2):
      b = pipeline.eval_host_batch(val, c, idx, process_index=p, process_count=2)
      assert b["features"].shape[0] == c.data.eval_batch_size // 2
      seen += [(int(d), int(n)) for d, n, w in zip(b["day"], b["n_time_steps"], b["weight"]) if w]
  assert sorted(seen) == sorted(zip(val.day.tolist(), val.n_time_steps.tolist()))
  # A batch that does not split evenly over the hosts is refused (it would silently drop the remainder rows).
  with pytest.raises(ValueError, match="config.data.eval_batch_size=8 does not divide the 3 processes"):
    pipeline.eval_host_batch(val, c, plan[0], process_index=0, process_count=3)
  with pytest.raises(ValueError, match="config.data.batch_size=8 does not divide the 3 processes"):
    pipeline.train_host_batch(split, c, 0, process_index=0, process_count=3)


def test_prefetcher_runs_ahead_boundedly_in_order_and_reraises():
  produced = []

  def slow(k):
    time.sleep(0.01 * (k % 3))  # out-of-order completion across workers
    produced.append(k)
    return k * 10

  with batching.Prefetcher(slow, range(100), 3, workers=2) as it:
    gen = iter(it)
    first = next(gen)
    time.sleep(0.3)
    assert first == (0, 0) and len(produced) <= 1 + 3  # bounded: the one in hand plus depth
    assert [next(gen) for _ in range(5)] == [(k, 10 * k) for k in range(1, 6)]
  assert not any(t.name.startswith("b2t-prefetch") and t.is_alive() for t in threading.enumerate())

  def boom(k):
    if k == 2:
      raise RuntimeError("bad record 2")
    return k

  with pytest.raises(RuntimeError, match="bad record 2"):
    list(batching.Prefetcher(boom, range(5), 2, workers=2))
  assert [v for _, v in batching.Prefetcher(boom, range(2), 0)] == [0, 1]


def test_hdf5_data_dir_is_prepared_once_into_a_content_keyed_cache(tmp_path, synthetic_dir, monkeypatch):
  tree = tmp_path / "hdf5"
  shutil.copytree(synthetic_dir, tree)
  c = tiny_config(str(tree))
  c.data.cache_dir = str(tmp_path / "cache")
  calls = []
  real = tfds_b2t.prepare
  monkeypatch.setattr(tfds_b2t, "prepare", lambda *a, **k: calls.append(a) or real(*a, **k))
  first = prepare.resolve_dataset(c, str(tmp_path / "work"))
  assert prepare.resolve_dataset(c, str(tmp_path / "work2")) == first and len(calls) == 1  # reused
  with h5py.File(tree / T15_SESSIONS[1] / "data_train.hdf5", "r+") as f:  # the tree changes
    f["trial_0000"].attrs["block_num"] = 7
  second = prepare.resolve_dataset(c, str(tmp_path / "work"))
  assert second != first and len(calls) == 2
  assert len(os.listdir(tmp_path / "cache")) == 2 and not any(".tmp-" in n for n in os.listdir(tmp_path / "cache"))


# ---- bad input: each raises a DataError naming file/trial/field, or is skipped and counted ----


def _tree(tmp_path, synthetic_dir):
  root = tmp_path / "tree"
  shutil.copytree(synthetic_dir, root)
  return root


def _set(path, fn):
  with h5py.File(path, "r+") as f:
    fn(f)


def _replace(name, key, value):
  def fn(f):
    del f[name][key]
    f[name].create_dataset(key, data=value)

  return fn


def _corrupt_chunk(path, name):
  """Stores trial `name`'s features as one gzip-compressed chunk (real files may be compressed), then overwrites
  bytes in the middle of the chunk's storage, so HDF5 fails to inflate it when the trial is read."""
  with h5py.File(path, "r+") as f:
    x = f[name]["input_features"][()]
    del f[name]["input_features"]
    info = f[name].create_dataset("input_features", data=x, chunks=x.shape, compression="gzip").id.get_chunk_info(0)
  with open(path, "r+b") as fh:
    fh.seek(info.byte_offset + info.size // 2)
    fh.write(b"\xff" * 64)


S1 = T15_SESSIONS[1]
BAD_INPUTS = [
  # (what, corrupt(root), error regex, reason, skipped count)
  (
    "truncated file",
    lambda r: open(r / S1 / "data_train.hdf5", "r+b").truncate(2000),
    r"data_train.hdf5: cannot be opened as HDF5.*truncated",
    "unreadable_file",
    1,
  ),
  (
    "missing key",
    lambda r: _set(r / S1 / "data_train.hdf5", lambda f: f["trial_0002"].__delitem__("seq_class_ids")),
    r"data_train.hdf5: trial_0002: field 'seq_class_ids': missing dataset",
    "missing_field",
    1,
  ),
  (
    "label id 41",
    lambda r: _set(r / S1 / "data_train.hdf5", lambda f: f["trial_0003"]["seq_class_ids"].__setitem__(0, 41)),
    r"trial_0003: field 'seq_class_ids': ids must lie in 1..40",
    "label_out_of_range",
    1,
  ),
  (
    "label id 0",
    lambda r: _set(r / S1 / "data_val.hdf5", lambda f: f["trial_0001"]["seq_class_ids"].__setitem__(0, 0)),
    r"data_val.hdf5: trial_0001: field 'seq_class_ids'",
    "label_out_of_range",
    1,
  ),
  (
    "NaN and Inf",
    lambda r: _set(
      r / S1 / "data_train.hdf5",
      lambda f: (
        f["trial_0004"]["input_features"].__setitem__((3, 7), np.nan),
        f["trial_0005"]["input_features"].__setitem__((0, 0), np.inf),
      ),
    ),
    r"trial_0004: field 'input_features': 1 non-finite",
    "non_finite",
    2,
  ),
  (
    "zero-length trial",
    lambda r: _set(
      r / S1 / "data_train.hdf5",
      lambda f: (
        _replace("trial_0006", "input_features", np.zeros((0, 512), np.float32))(f),
        f["trial_0006"].attrs.__setitem__("n_time_steps", 0),
      ),
    ),
    r"trial_0006: field 'input_features': zero-length trial",
    "zero_length",
    1,
  ),
  (
    "session not in the list",
    lambda r: shutil.copytree(r / S1, r / "t15.2031.01.01"),
    r"\['t15.2031.01.01'\] are not in config.data.sessions",
    "session_not_in_config",
    16,
  ),
  (
    "corrupt compressed chunk",
    lambda r: _corrupt_chunk(r / S1 / "data_train.hdf5", "trial_0002"),
    r"data_train.hdf5: trial_0002: field 'input_features': cannot be read \(.*\); the file is damaged",
    "unreadable_trial",
    1,
  ),
  (
    "session folder without its train file",
    lambda r: os.remove(r / S1 / "data_train.hdf5"),
    rf"session folder\(s\) \['{S1}'\] have no data_train.hdf5",
    "missing_train_file",
    1,
  ),
]
LOST_TRIALS = {"unreadable_file": 16, "session_not_in_config": 0, "missing_train_file": 16}  # else `count`


@pytest.mark.parametrize("what, corrupt, message, reason, count", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_stops_with_a_named_error_or_is_skipped_and_counted(
  tmp_path, synthetic_dir, what, corrupt, message, reason, count
):
  root = _tree(tmp_path, synthetic_dir)
  corrupt(root)
  with pytest.raises(DataError, match=message) as e:
    tfds_b2t.prepare(str(root), str(tmp_path / "stop"))
  assert "on_bad_trial='skip'" in str(e.value) or "not in config.data.sessions" in str(e.value)
  out = tfds_b2t.prepare(str(root), str(tmp_path / "skip"), on_bad_trial="skip")
  split_name = "val" if "val" in message else "train"
  c = tiny_config(str(tmp_path / "skip"))
  c.data.on_bad_trial = "skip"
  split = pipeline.open_split(out, c, split_name, train=split_name == "train")
  assert split.skipped["prepare"] == {reason: count}
  n_clean = {"train": 48, "val": 8}[split_name]
  assert len(split) == n_clean - LOST_TRIALS.get(reason, count)
  pipeline.write_skips(str(tmp_path / "work"), [split])
  written = json.load(open(tmp_path / "work" / pipeline.SKIPS_FILE))
  assert written[split_name]["prepare"] == {reason: count} and written[split_name]["kept"] == len(split)


def test_skips_file_is_replaced_whole_or_left_as_it_was(prepared_dir, tmp_path):
  train, _ = _open(prepared_dir, "train")
  val, _ = _open(prepared_dir, "val", train=False)
  path = tmp_path / pipeline.SKIPS_FILE
  pipeline.write_skips(str(tmp_path), [val])  # a previous run's file
  before = path.read_text()
  # The disk fills up mid-write: RLIMIT_FSIZE makes any write past the limit fail (EFBIG) after a partial write.
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  on_xfsz = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # report EFBIG instead of killing us
  resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) // 2, hard))
  try:
    with pytest.raises(OSError):
      pipeline.write_skips(str(tmp_path), [train, val])
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, on_xfsz)
  assert path.read_text() == before and os.listdir(tmp_path) == [pipeline.SKIPS_FILE]  # whole, no temp left
  path.write_text(before[: len(before) // 2])  # torn by an older version: start afresh
  pipeline.write_skips(str(tmp_path), [train, val])
  assert sorted(json.loads(path.read_text())) == ["train", "val"]


def test_trials_too_short_for_their_labels_after_patching(prepared_dir, tmp_path):
  # A stride of 5 bins leaves too few CTC frames for some synthetic sentences (about one label per 5 bins).
  c = tiny_config(prepared_dir)
  c.model.patch_stride = 5
  ds = prepare.find_dataset_dir(prepared_dir)
  with pytest.raises(
    DataError,
    match=r"t15\.2023\.08\.\d\d trial_\d{4} \(train record \d+\): \d+ bins give \d+ "
    r"CTC frames after patching \(size 14, stride 5\), but its \d+ labels need \d+ .*on_bad_trial='skip'",
  ):
    pipeline.open_split(ds, c, "train", train=True)
  c.data.on_bad_trial = "skip"
  split = pipeline.open_split(ds, c, "train", train=True)
  frames = (split.n_time_steps - 14) // 5 + 1
  expected = int(np.sum(frames < split.ctc_len))
  assert 0 < expected < 48 and split.skipped["load"] == {"too_short_for_labels": expected}
  assert len(split) == 48 - expected
  kept = np.concatenate(list(split.day_indices().values()))
  assert np.all(frames[kept] >= split.ctc_len[kept])
  pipeline.write_skips(str(tmp_path), [split])
  assert json.load(open(tmp_path / pipeline.SKIPS_FILE))["train"]["load"] == {"too_short_for_labels": expected}


def test_label_longer_than_config_padding_is_caught_at_load(prepared_dir):
  c = tiny_config(prepared_dir)
  c.data.max_label_len = 12
  ds = prepare.find_dataset_dir(prepared_dir)
  with pytest.raises(DataError, match=r"phonemes exceed config.data.max_label_len=12"):
    pipeline.open_split(ds, c, "train", train=True)
  c.data.on_bad_trial = "skip"
  split = pipeline.open_split(ds, c, "train", train=True)
  assert split.skipped["load"]["label_too_long"] == int(np.sum(split.label_len > 12)) > 0


def test_dataset_built_for_another_session_list_is_refused(prepared_dir):
  c = tiny_config(prepared_dir)
  c.data.sessions = tuple(reversed(T15_SESSIONS))
  with pytest.raises(DataError, match="different session list"):
    pipeline.open_split(prepare.find_dataset_dir(prepared_dir), c, "train", train=True)


def test_prepared_dataset_is_reused_only_when_built_from_the_same_files_and_options(tmp_path, synthetic_dir):
  tree, data = _tree(tmp_path, synthetic_dir), str(tmp_path / "tfds")
  out = tfds_b2t.prepare(str(tree), data)
  shard = next(p for p in os.listdir(out) if "array_record" in p)
  built = os.stat(os.path.join(out, shard)).st_mtime_ns
  assert tfds_b2t.prepare(str(tree), data) == out  # unchanged: reused
  assert os.stat(os.path.join(out, shard)).st_mtime_ns == built
  with pytest.raises(DataError, match=r"config.data.on_bad_trial: prepared with 'error', now 'skip'.*--overwrite"):
    tfds_b2t.prepare(str(tree), data, on_bad_trial="skip")
  with pytest.raises(DataError, match=r"config.data.sessions: prepared with a 45-session list, now another of 3"):
    tfds_b2t.prepare(str(tree), data, sessions=T15_SESSIONS[:3])
  _set(tree / S1 / "data_train.hdf5", lambda f: f["trial_0000"].attrs.__setitem__("block_num", 7))
  os.remove(tree / T15_SESSIONS[2] / "data_val.hdf5")
  with pytest.raises(
    DataError,
    match=rf"HDF5 file\(s\) gone: {T15_SESSIONS[2]}/data_val.hdf5; HDF5 file\(s\) "
    rf"changed \(size or modification time\): {S1}/data_train.hdf5\. Rerun",
  ):
    tfds_b2t.prepare(str(tree), data)
  assert os.stat(os.path.join(out, shard)).st_mtime_ns == built  # refused: left as it was
  assert tfds_b2t.prepare(str(tree), data, on_bad_trial="skip", overwrite=True) == out  # rebuilt from the tree
  c = tiny_config(data)
  c.data.on_bad_trial = "skip"
  first_of_s1 = pipeline.open_split(out, c, "train", train=True).read([16])[0]  # after session 0's 16 trials
  assert (first_of_s1.session, first_of_s1.index_in_file, first_of_s1.block) == (S1, 0, 7)
  assert len(pipeline.open_split(out, c, "val", train=False)) == 4  # 8 before the file went
  assert tfds_b2t.prepare(str(tree), data, on_bad_trial="skip") == out  # and reused after


def test_prepare_data_tool(tmp_path, synthetic_dir):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.run(
    [
      sys.executable,
      "tools/prepare_data.py",
      f"--hdf5_dir={synthetic_dir}",
      f"--data_dir={tmp_path}",
      "--config.data.on_bad_trial=skip",
    ],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0, p.stderr[-2000:]
  assert "prepared {'train': 48, 'val': 8, 'test': 8}" in p.stdout
  assert "Generating train examples" in p.stderr  # the progress bar
  c = tiny_config(str(tmp_path))
  assert (
    json.load(open(os.path.join(prepare.find_dataset_dir(str(tmp_path)), "metadata.json")))["on_bad_trial"] == "skip"
  )
  assert len(pipeline.open_split(prepare.find_dataset_dir(str(tmp_path)), c, "val", train=False)) == 8
  # Other build options on the same --data_dir: a one-line refusal naming the difference, then --overwrite.
  again = [sys.executable, "tools/prepare_data.py", f"--hdf5_dir={synthetic_dir}", f"--data_dir={tmp_path}"]
  p = subprocess.run(again, cwd=root, capture_output=True, text=True, timeout=300)
  assert p.returncode == 1 and "Traceback" not in p.stderr
  assert "config.data.on_bad_trial: prepared with 'skip', now 'error'. Rerun with --overwrite" in p.stderr
  p = subprocess.run(again + ["--overwrite"], cwd=root, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  meta = json.load(open(os.path.join(prepare.find_dataset_dir(str(tmp_path)), "metadata.json")))
  assert meta["on_bad_trial"] == "error"


def test_in_memory_split_of_a_prepared_dataset_equals_the_hdf5_split(prepared_dir, synthetic_dir):
  c = tiny_config(prepared_dir)
  val = pipeline.open_split(prepare.find_dataset_dir(prepared_dir), c, "val", train=False)
  got = val.read(np.flatnonzero(val.keep))
  want = load_hdf5_split(synthetic_dir, T15_SESSIONS, "val", feature_pool=c.data.feature_pool)
  assert len(got) == len(want) == 8
  for a, b in zip(got, want.trials):
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (a.day, a.session, a.block, a.trial, a.sentence) == (b.day, b.session, b.block, b.trial, b.sentence)
