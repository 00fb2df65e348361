"""Self-check against our own bias: a model that reads all 512 columns must learn the synthetic data just as
well when those columns are shuffled by a fixed permutation.

Real arrays give no column order to exploit (neighbouring electrodes do not share tuning), so a recipe that
learns the t15 column order of our generator but not a shuffled copy learns the generator, not a brain (the
old demo's 32-column pooling did exactly that). Both runs use the same seeds on the same trials; only the
column order differs, and nothing in the model (a full 512 x 512 day layer initialised to the identity, then
the demo's dense projection) can tell one order from the other, so the two PERs differ by training noise only.
The model is the demo's front end and optimizer on a small GRU decoder (one front end: fast to compile),
trained in-process on one device.
"""

import os

import h5py
import jax
import numpy as np
import pytest

from b2t_jax import experiment, metrics, sharding
from b2t_jax.data import pipeline
from b2t_jax.data.synthetic import column_permutation, make_synthetic_dataset
from b2t_jax.data.t15 import T15_SESSIONS
from configs import demo

N_SESSIONS = 4
STEPS = 250
# Tolerances. Chance (emitting nothing) is PER 1.0; a model stuck at blanks and frequent tokens stays > 0.9.
LEARNED_PER = 0.75  # each run must get at least this far below chance
SAME_PER = 0.1  # |PER(plain) - PER(shuffled)|: training noise of two equivalent runs


def _config():
  c = demo.get_config()
  c.data.sessions = T15_SESSIONS[:N_SESSIONS]
  assert c.data.feature_pool == 1 and c.model.patch_features > 0  # every one of the 512 columns is read
  c.model.kind, c.model.hidden, c.model.n_layers = "gru", 128, 2  # the demo width: cheap beside the day layer
  c.data.batch_size, c.data.days_per_batch = 16, 2
  c.optim.warmup_steps = c.optim.day_warmup_steps = 20
  c.optim.decay_steps = STEPS
  return c


def _val_per(root: str, workdir: str) -> float:
  c = _config()
  c.data.data_dir, c.data.cache_dir = root, os.path.join(workdir, "cache")
  exp = experiment.Experiment(c, mesh=sharding.create_mesh((1, 1), jax.devices()[:1]))
  data = experiment.open_data(c, workdir)
  tr, val = data["train"], data["val"]
  state = exp.init_state()
  for k in range(STEPS):
    b = pipeline.train_host_batch(tr, c, k)
    state, _ = exp.train_step(state, sharding.shard_batch(b, exp.mesh))
  per = metrics.ErrorRate()
  for idx in pipeline.eval_plan(val, c.data.eval_batch_size):
    b = pipeline.eval_host_batch(val, c, idx)
    out = sharding.to_host(exp.eval_step(state.params, sharding.shard_batch(b, exp.mesh)))
    for r in range(len(idx)):
      hyp = metrics.greedy_decode(out["pred"][r], int(out["input_lens"][r]))
      per.add(int(b["day"][r]), hyp, b["labels"][r, : b["label_lens"][r]].tolist())
  return per.rate()


def _features(root: str, session: str, split_file: str, trial: str) -> np.ndarray:
  with h5py.File(os.path.join(root, session, split_file)) as f:
    return f[trial]["input_features"][()]


@pytest.mark.slow
def test_model_learns_shuffled_columns_as_well_as_plain(tmp_path):
  kw = dict(n_sessions=N_SESSIONS, trials_per_session=48, seed=0)
  plain = make_synthetic_dataset(str(tmp_path / "plain"), T15_SESSIONS, **kw)
  shuffled = make_synthetic_dataset(str(tmp_path / "shuffled"), T15_SESSIONS, permute_columns=3, **kw)
  perm = column_permutation(3)
  assert (perm != np.arange(512)).mean() > 0.99
  trial = (T15_SESSIONS[1], "data_val.hdf5", "trial_0002")  # same trials, columns reordered, nothing else
  np.testing.assert_array_equal(_features(shuffled, *trial), _features(plain, *trial)[:, perm])
  per = {
    name: _val_per(root, str(tmp_path / f"{name}_work")) for name, root in (("plain", plain), ("shuffled", shuffled))
  }
  print(per)
  assert per["plain"] < LEARNED_PER and per["shuffled"] < LEARNED_PER, per
  assert abs(per["plain"] - per["shuffled"]) < SAME_PER, per
