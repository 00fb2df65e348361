"""Ensembles (train.n_models = K): one jitted step trains K members stacked on a leading axis; member k is the
single model of seed + k; decoding merges members by the mean of their log-probabilities."""

import json
import os

import jax
import numpy as np
import pytest
from test_train import assert_same_updates

from b2t_jax import evaluation, experiment, steps
from b2t_jax.data import pipeline
from b2t_jax.sharding import create_mesh, shard_batch

K = 3


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_merge_is_the_renormalised_mean_of_log_probabilities():
  logits = np.random.default_rng(0).normal(size=(K, 5, 41)).astype(np.float32) * 3
  mean = _log_softmax(logits).mean(axis=0)  # NumPy reference
  merged = np.asarray(steps.merge_log_probs(logits, axis=0))
  np.testing.assert_allclose(merged, _log_softmax(mean), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.exp(merged).sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(merged.argmax(-1), mean.argmax(-1))


def _member(tree, k):
  return jax.tree.map(lambda a: np.asarray(a)[k], tree)


def test_a_k_member_step_equals_k_single_member_steps(tiny):
  """Init bit-identical; after three steps at the peak LR (dropout on: each member draws its own seed's masks)
  every member's parameter updates equal its single model's (vmap may reorder float sums). The ensemble logic does
  not depend on the decoder, so the cheaper one-stack GRU decoder stands in for the triple."""
  tiny.model.kind, tiny.model.n_layers = "gru", 2
  tiny.optim.warmup_steps = tiny.optim.day_warmup_steps = 0
  tiny.train.n_models = K
  ens = experiment.Experiment(tiny)
  singles = []
  for k in range(K):
    cfg = tiny.copy_and_resolve_references()
    cfg.train.n_models, cfg.seed = 1, tiny.seed + k
    singles.append(experiment.Experiment(cfg))
  split = experiment.open_data(tiny, "/tmp/unused-workdir", ("train",))["train"]
  batches = [pipeline.train_host_batch(split, tiny, i) for i in range(3)]

  state = ens.init_state()
  single_states = [e.init_state() for e in singles]
  init = [jax.device_get(s.params) for s in single_states]
  for k in range(K):
    jax.tree.map(np.testing.assert_array_equal, _member(state.params, k), init[k])
  for batch in batches:
    state, m = ens.train_step(state, shard_batch(batch, ens.mesh))
    for k, e in enumerate(singles):
      single_states[k], sm = e.train_step(single_states[k], shard_batch(batch, e.mesh))
      np.testing.assert_allclose(float(m[f"loss_member_{k}"]), float(sm["loss"]), rtol=2e-5)
  assert int(state.step) == 3
  for k, s in enumerate(single_states):
    delta = lambda p: jax.tree.map(lambda a, a0: np.asarray(a) - a0, p, init[k])
    assert_same_updates(delta(jax.device_get(s.params)), delta(_member(state.params, k)))

  # Evaluation: each member's PER is its single model's; the ensemble's comes from the merged log-probabilities.
  val = experiment.open_data(tiny, "/tmp/unused-workdir", ("val",))["val"]
  plan = pipeline.eval_plan(val, tiny.data.eval_batch_size)
  result = evaluation.evaluate(ens, state.params, val, plan)
  for k, (e, s) in enumerate(zip(singles, single_states)):
    assert result[f"val_per_member_{k}"] == pytest.approx(evaluation.evaluate(e, s.params, val, plan)["val_per"])
  batch = shard_batch(pipeline.eval_host_batch(val, tiny, plan[0]), ens.mesh)
  out = jax.device_get(ens.eval_step(state.params, batch))
  members = [
    np.asarray(steps.inference_logits(s.params, batch, model=e.model, config=e.config)[0])
    for e, s in zip(singles, single_states)
  ]
  mean = np.mean([_log_softmax(m) for m in members], axis=0)
  # mode=infer's infer.member=1 decodes member 1 alone: its single model's logits.
  from b2t_jax import infer

  alone = infer.member_logits(ens, state.params, 1, val)
  single = infer.split_logits(singles[1], single_states[1].params, val)
  for r, lg in alone.items():
    np.testing.assert_allclose(lg, single[r], rtol=1e-4, atol=1e-4)
  agree = out["pred"] == mean.argmax(-1)
  assert agree.mean() > 0.999  # frames whose top two merged classes tie within float error may differ


@pytest.mark.parametrize("rules", [None, (("members", "model"),)])
def test_ensemble_state_is_sharded_by_the_members_rule(tiny, rules):
  tiny.train.n_models = 2
  tiny.mesh_shape = (4, 2)
  if rules is not None:
    # First, so that it wins the 'model' axis over noise_hidden in the noise GRU's kernels.
    tiny.logical_axis_rules = rules + tuple(r for r in tiny.logical_axis_rules if r[0] != "members")
  exp = experiment.Experiment(tiny, mesh=create_mesh((4, 2)))
  first = {
    jax.tree_util.keystr(p): (s.spec[0] if len(s.spec) else None)
    for p, s in jax.tree_util.tree_leaves_with_path(exp.state_shardings.params)
  }
  assert set(first.values()) == ({"model"} if rules else {None}), first
  state = exp.init_state()
  assert all(a.shape[0] == 2 for a in jax.tree.leaves(state.params))


def test_infer_merges_separately_trained_workdirs_and_names_a_mismatch(tiny, tmp_path):
  from b2t_jax import infer, train

  tiny.train.num_steps = 2
  work, configs = [], []
  for seed in (10, 11):
    configs.append(tiny.copy_and_resolve_references())
    configs[-1].seed = seed
    work.append(str(tmp_path / f"seed{seed}"))
    train.train_and_evaluate(configs[-1], work[-1])
  val = experiment.open_data(tiny, str(tmp_path / "scratch"), ("val",))["val"]
  each = []
  for cfg, w in zip(configs, work):
    exp = experiment.Experiment(cfg)
    each.append(infer.split_logits(exp, evaluation.restore_for_reading(exp, w, "best").params, val))
  cfg = tiny.copy_and_resolve_references()
  cfg.infer.ensemble_workdirs = work[1]
  merged, step = infer.ensemble_logits(cfg, work[0], val)
  assert step == 2 and sorted(merged) == sorted(each[0])
  for r, lg in merged.items():
    want = _log_softmax(np.mean([_log_softmax(e[r]) for e in each], axis=0))
    np.testing.assert_allclose(lg, want, rtol=1e-5, atol=1e-5)

  bad = tmp_path / "other_patching"
  bad.mkdir()
  recorded = json.loads(open(os.path.join(work[1], "config.json")).read())
  (bad / "config.json").write_text(json.dumps({**recorded, "model.patch_stride": 3}))
  cfg.infer.ensemble_workdirs = f"{work[1]},{bad}"
  with pytest.raises(ValueError, match=r"other_patching cannot be merged.*\n  model.patch_stride: 4 here, 3 in"):
    infer.ensemble_logits(cfg, work[0], val)
