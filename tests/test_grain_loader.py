"""The Grain input pipeline gives the thread pipeline's batches byte for byte; training on it, with a profile."""

import gc
import glob
import os
import time
from multiprocessing import shared_memory

import pytest
from conftest import tiny_config

from b2t_jax import experiment, sharding, train
from b2t_jax.data import grain_loader, pipeline, prepare


def _split(config):
  return pipeline.open_split(prepare.find_dataset_dir(config.data.data_dir), config, "train", train=True)


def _assert_same(batch, ref, what):
  assert batch.keys() == ref.keys(), what
  for k in ref:
    assert (batch[k].dtype, batch[k].shape) == (ref[k].dtype, ref[k].shape), (what, k)
    assert batch[k].tobytes() == ref[k].tobytes(), (what, k)


@pytest.mark.parametrize("length_aware", [False, True])
def test_grain_batches_equal_the_thread_pipelines_byte_for_byte(tiny, length_aware):
  """Each process's rows of batches 3..5 (a resume at step 3), one and two processes, in this process (workers 0)."""
  tiny.data.length_aware = length_aware
  tiny.data.grain_workers = 0
  split = _split(tiny)
  for pi, pc in ((0, 1), (0, 2), (1, 2)):
    with grain_loader.TrainBatches(split, tiny, 3, 6, process_index=pi, process_count=pc) as batches:
      got = list(batches)
    assert [step for step, _ in got] == [3, 4, 5]
    for step, batch in got:
      ref = pipeline.train_host_batch(split, tiny, step, process_index=pi, process_count=pc)
      assert batch["features"].shape[0] == tiny.data.batch_size // pc
      _assert_same(batch, ref, (pi, pc, step))


@pytest.mark.slow
def test_training_on_grain_takes_the_same_steps_and_writes_a_profile(prepared_dir, tmp_path):
  """A run fed by Grain (two worker processes, building alternate batches) ends on the loss of the same steps taken
  by hand on the thread pipeline's batches, exactly; with train.profile_steps=1 it leaves an XPlane trace under
  WORKDIR/plugins/profile."""
  c = tiny_config(prepared_dir)
  c.data.loader, c.data.grain_workers, c.data.prefetch_workers = "grain", 2, 1
  c.train.num_steps, c.train.profile_steps = 3, 1
  out = train.train_and_evaluate(c, str(tmp_path))
  exp = experiment.Experiment(c)
  state = exp.init_state()
  split = _split(c)
  for k in range(3):
    state, m = exp.train_step(state, sharding.shard_batch(pipeline.train_host_batch(split, c, k), exp.mesh))
  assert out["step"] == 3 and out["train"]["loss"] == float(m["loss"])  # log_every=1: the loss of step 2
  traces = glob.glob(str(tmp_path / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1 and os.path.getsize(traces[0]) > 0


@pytest.mark.slow
def test_shared_memory_is_closed_once(tiny, monkeypatch):
  """Two worker processes put each batch in shared memory, a block per array. Over a pass through the batches,
  its close and a garbage collection (as the training loop's end brings about), no block is finalized while still
  open (Grain's own thread closes it then too, and one of the two closes can hit a descriptor another thread has
  just opened: CI's 'fsync ... Bad file descriptor' in an orbax save; see TrainBatches), no close fails, and every
  block ends closed and unlinked."""
  tiny.data.grain_workers, tiny.data.prefetch_workers = 2, 1
  finalized_open, failed = [], []
  real_close, real_del = os.close, shared_memory.SharedMemory.__del__

  def close(fd):
    try:
      real_close(fd)
    except OSError as e:
      failed.append((fd, e.errno))
      raise

  def finalize(self):
    if self.buf is not None:
      finalized_open.append(self.name)
    real_del(self)

  monkeypatch.setattr(os, "close", close)
  monkeypatch.setattr(shared_memory.SharedMemory, "__del__", finalize)
  names = set()
  with grain_loader.TrainBatches(_split(tiny), tiny, 0, 6) as batches:
    for _, batch in batches:
      names |= {v.shm.name for v in batch.values()}  # names only: a reference to a block would keep it alive
  assert len(names) == 6 * 6  # six arrays a batch, each in its own block
  del batch, batches
  gc.collect()
  deadline = time.monotonic() + 10
  while any(os.path.exists(f"/dev/shm/{n}") for n in names) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not [n for n in names if os.path.exists(f"/dev/shm/{n}")]
  assert finalized_open == [] and failed == []
