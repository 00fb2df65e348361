"""Diphone targets (config.model.targets = diphone | both): the class layout and labels, the marginalisation, the
diphone CTC, the models' outputs for every kind, ensembles, the config check and the workdir guard. Streaming:
test_streaming.py; the command line: test_main.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from test_encoders import tiny_encoder
from test_losses import numpy_ctc_nll

from b2t_jax import config_check, diphones, losses, steps, summary, vocab, workdir
from b2t_jax.data.augment import preprocess
from b2t_jax.models import create_model
from b2t_jax.torch_import import export
from configs import gru_baseline

N = 41  # phoneme classes (SPEC §2)
K = N - 1  # non-blank ones
ID = {p.strip(): i for i, p in enumerate(vocab.PHONEMES)}  # 'HH' -> 16, '|' -> 40


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def numpy_marginal(diphone_logits):
  """Phoneme log-probabilities from diphone logits, by explicit sums over the documented layout (float64)."""
  p = np.exp(_log_softmax(diphone_logits))
  out = np.zeros(p.shape[:-1] + (N,))
  out[..., 0] = p[..., 0]
  for cur in range(1, N):
    for prev in range(1, N):
      out[..., cur] += p[..., 1 + (prev - 1) * K + (cur - 1)]
  return np.log(out)


def test_labels_become_diphones_as_the_documented_layout_says():
  """'hello' = HH AH L OW | and a run of three B; the first prev is the boundary, padding stays 0."""
  hello = [ID[p] for p in ("HH", "AH", "L", "OW", "|")]
  labels = jnp.array([hello + [0], [ID["B"]] * 3 + [0, 0, 0]], jnp.int32)
  got = np.asarray(diphones.diphone_labels(labels, jnp.array([5, 3]), N))
  # (prev, cur) -> 1 + (prev - 1) * 40 + (cur - 1), by hand: | = 40, HH = 16, AH = 3, L = 21, OW = 25, B = 7
  np.testing.assert_array_equal(
    got,
    [
      [1 + 39 * 40 + 15, 1 + 15 * 40 + 2, 1 + 2 * 40 + 20, 1 + 20 * 40 + 24, 1 + 24 * 40 + 39, 0],
      [1 + 39 * 40 + 6, 1 + 6 * 40 + 6, 1 + 6 * 40 + 6, 0, 0, 0],
    ],
  )
  assert diphones.n_diphone_classes(N) == 1601 and diphones.diphone_index(K, K, N) == 1600
  assert diphones.head_classes("phoneme", N) == 41 and diphones.head_classes("both", N) == 1601
  # B B B needs 5 frames as phonemes (a blank between each pair), 4 as diphones ((|,B) (B,B) _ (B,B))
  np.testing.assert_array_equal(losses.min_ctc_frames(labels[1:], jnp.array([3])), [5])
  np.testing.assert_array_equal(losses.min_ctc_frames(jnp.asarray(got[1:]), jnp.array([3])), [4])


def test_marginal_log_probs_sum_over_the_previous_phoneme():
  logits = np.random.default_rng(0).normal(size=(2, 3, 1601)).astype(np.float32) * 3
  got = np.asarray(diphones.marginal_log_probs(jnp.asarray(logits), N))
  assert got.shape == (2, 3, N) and got.dtype == np.float32
  np.testing.assert_allclose(got, numpy_marginal(logits), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(got)), got, atol=1e-6)  # already normalised


def test_factored_logits_follow_the_documented_layout():
  """The factored head's logit of (prev, cur) is u[cur] + v[(prev, cur)], the blank's u[0] + log K + v[0]
  (explicit loops over the layout, float64); with v = 0 its marginals are softmax(u): a phoneme head."""
  rng = np.random.default_rng(1)
  u, v = rng.normal(size=(2, 3, N)) * 2, rng.normal(size=(2, 3, 1601))
  want = np.empty((2, 3, 1601))
  want[..., 0] = u[..., 0] + np.log(K) + v[..., 0]
  for prev in range(1, N):
    for cur in range(1, N):
      i = 1 + (prev - 1) * K + (cur - 1)
      want[..., i] = u[..., cur] + v[..., i]
  got = diphones.factored_logits(jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32), N)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
  at_zero = diphones.factored_logits(jnp.asarray(u, jnp.float32), jnp.zeros((2, 3, 1601)), N)
  np.testing.assert_allclose(np.asarray(diphones.marginal_log_probs(at_zero, N)), _log_softmax(u), atol=1e-5, rtol=0)


def test_diphone_ctc_loss_against_numpy():
  """decoder_loss of diphone outputs: CTC of the diphone logits on the diphone labels, plus w_m * CTC of their
  phoneme marginals, plus w_p * CTC of the auxiliary phoneme head (both); infeasible trials by the phonemes' rule,
  padding rows out."""
  rng = np.random.default_rng(1)
  b, p = 4, 9
  dl = rng.normal(size=(b, p, 1601)).astype(np.float32) * 2
  pl = rng.normal(size=(b, p, N)).astype(np.float32)
  labels = np.array([[16, 3, 21, 25, 40], [7, 7, 7, 0, 0], [5, 40, 9, 0, 0], [1, 2, 0, 0, 0]], np.int32)
  label_lens = np.array([5, 3, 3, 2], np.int32)
  # row 1: B B B fits 4 frames as diphones, not as phonemes (5): masked and counted; row 3 is padding
  input_lens = np.array([9, 4, 7, 9], np.int32)
  weights = np.array([1, 1, 1, 0], np.float32)
  outputs = {
    "logits": diphones.marginal_log_probs(jnp.asarray(dl), N),
    "diphone_logits": jnp.asarray(dl),
    "phoneme_logits": jnp.asarray(pl),
  }
  args = (jnp.asarray(input_lens), jnp.asarray(labels), jnp.asarray(label_lens), jnp.asarray(weights))
  weights_of = functools.partial(losses.decoder_loss, noisy_weight=0.2, noise_l2_weight=0.0, phoneme_weight=0.3)
  loss_fn = jax.jit(functools.partial(weights_of, marginal_weight=0.7))
  loss, aux = loss_fn(outputs, *args)

  def diphone_seq(row):
    prev = [ID["|"]] + row[:-1]
    return [1 + (a - 1) * K + (c - 1) for a, c in zip(prev, row)]

  rows = (0, 2)
  want_d = np.mean(
    [numpy_ctc_nll(dl[i, : input_lens[i]], diphone_seq(labels[i, : label_lens[i]].tolist())) for i in rows]
  )
  want_p = np.mean([numpy_ctc_nll(pl[i, : input_lens[i]], labels[i, : label_lens[i]].tolist()) for i in rows])
  marginal = numpy_marginal(dl)
  want_m = np.mean([numpy_ctc_nll(marginal[i, : input_lens[i]], labels[i, : label_lens[i]].tolist()) for i in rows])
  assert int(aux["n_infeasible"]) == 1 and float(aux["n_trials"]) == 2.0
  np.testing.assert_allclose(float(aux["ctc"]), want_d, rtol=1e-5)
  np.testing.assert_allclose(float(aux["ctc_phoneme"]), want_p, rtol=1e-5)
  np.testing.assert_allclose(float(aux["ctc_marginal"]), want_m, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want_d + 0.7 * want_m + 0.3 * want_p, rtol=1e-5)
  # without an auxiliary head (targets='diphone') and marginal weight 0: the diphone CTC alone
  del outputs["phoneme_logits"]
  alone, aux = jax.jit(functools.partial(weights_of, marginal_weight=0.0))(outputs, *args)
  np.testing.assert_allclose(float(alone), want_d, rtol=1e-5)
  assert "ctc_marginal" not in aux


@functools.cache
def _tiny(kind: str, targets: str, n_models: int = 1, head: str = "factored"):
  """A tiny model of `kind` and `targets` (2-layer GRU stacks, an intermediate head after layer 0, a `head`
  diphone head) and its params (stacked over `n_models` members of seeds 0..n-1)."""
  c = tiny_encoder("gru", kind, intermediate=(0,))
  c.model.targets, c.model.diphone_head, c.train.n_models = targets, head, n_models
  model = create_model(c)
  x = jnp.zeros((1, 60, 8))
  init = jax.jit(lambda k: nn.unbox(model.init(k, x, jnp.zeros((1,), jnp.int32))["params"]))
  members = [init(jax.random.PRNGKey(s)) for s in range(n_models)]
  params = members[0] if n_models == 1 else jax.tree.map(lambda *a: jnp.stack(a), *members)
  return c, model, params


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.normal(size=(3, 60, 8)), jnp.float32), jnp.array([0, 1, 2], jnp.int32)


@pytest.mark.parametrize("kind,targets,head", [("gru", "both", "factored"), ("triple", "diphone", "flat")])
def test_every_model_kind_decodes_41_marginal_classes(kind, targets, head):
  """Inference returns the (B, P, 41) marginals of the 1601-way head's 'full' output; the intermediate heads, the
  auxiliary phoneme head and the triple's noisy head are phoneme-level."""
  c, model, params = _tiny(kind, targets, head=head)
  x, day = _inputs()
  both_modes = jax.jit(lambda p: (model.apply({"params": p}, x, day, mode="full"), model.apply({"params": p}, x, day)))
  full, inference = both_modes(params)
  inference = np.asarray(inference)
  assert full["diphone_logits"].shape == (3, 12, 1601) and inference.shape == (3, 12, N)
  np.testing.assert_allclose(inference, numpy_marginal(full["diphone_logits"]), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(full["logits"]), inference, atol=1e-6, rtol=0)
  np.testing.assert_allclose(np.exp(inference).sum(-1), 1.0, atol=1e-5)
  assert [a.shape for a in full["intermediate"]] == [(3, 12, N)]
  speech = params if kind == "gru" else params["clean_model"]
  assert speech["out"]["kernel"].shape == (16, 1601) and speech["ictc_0"]["head"]["kernel"].shape == (16, N)
  assert ("phoneme_out" in speech) == (targets == "both")
  assert ("diphone_base" in speech) == (head == "factored")
  if targets == "both":
    assert full["phoneme_logits"].shape == (3, 12, N) and speech["phoneme_out"]["kernel"].shape == (16, N)
  if kind == "triple":
    assert full["noisy_logits"].shape == (3, 12, N) and params["noisy_model"]["out"]["kernel"].shape == (16, N)


def test_a_factored_head_starts_as_a_phoneme_head():
  """At initialisation the factored head's context kernel is zero, so its marginals are the log-softmax of its
  phoneme logits (diphone_base on the stream: the stack's output, read back through a phoneme-target model with
  the same stack parameters); a flat head's are near uniform over the 1,600 pairs instead."""
  c, model, params = _tiny("gru", "diphone")
  x, day = _inputs(2)
  np.testing.assert_array_equal(np.asarray(params["out"]["kernel"]), 0.0)
  marginals = np.asarray(jax.jit(lambda p: model.apply({"params": p}, x, day))(params))
  phon = c.copy_and_resolve_references()
  phon.model.targets = "phoneme"
  as_phonemes = {k: v for k, v in params.items() if k not in ("out", "diphone_base")}
  as_phonemes["out"] = params["diphone_base"]
  want = jax.jit(lambda p: create_model(phon).apply({"params": p}, x, day))(as_phonemes)
  np.testing.assert_allclose(marginals, np.asarray(jax.nn.log_softmax(want)), atol=1e-5, rtol=0)
  assert np.abs(np.exp(marginals[..., 1:]).sum(-1) - 1).max() > 1e-3  # not a trivial case: the blank has its share
  _, flat_model, flat_params = _tiny("gru", "diphone", head="flat")
  flat = np.asarray(flat_model.apply({"params": flat_params}, x, day))
  assert np.exp(flat[..., 0]).max() < 0.01  # the flat head's blank starts with about 1/1601 of the mass


def test_ensembles_merge_the_members_marginals_and_the_val_loss_is_their_ctc():
  """Two diphone members: ensemble_logits = the renormalised mean of their marginal log-probabilities (NumPy, from
  each member's diphone logits), and eval_step's loss the phoneme CTC of that merge."""
  c, model, params = _tiny("gru", "diphone", n_models=2)
  x, day = _inputs(1)
  batch = {"features": x, "n_time_steps": jnp.array([60, 52, 60], jnp.int32), "day": day}
  batch["labels"] = jnp.array([[16, 3, 21, 25, 40], [7, 40, 0, 0, 0], [5, 6, 9, 0, 0]], jnp.int32)
  batch["label_lens"] = jnp.array([5, 2, 3], jnp.int32)
  merge_and_eval = jax.jit(
    lambda p, b: (
      steps.ensemble_logits(p, b, model=model, config=c),
      steps.eval_step(p, b, model=model, config=c),
    )
  )
  (merged, input_lens, _), out = merge_and_eval(params, batch)
  # the members' own diphone logits, on the smoothed features eval reads (no augmentation)
  smoothed, _ = preprocess(None, x, batch["n_time_steps"], c.aug)
  member_logits = jax.jit(jax.vmap(lambda p: model.apply({"params": p}, smoothed, day, mode="full")["diphone_logits"]))
  want = _log_softmax(np.mean([numpy_marginal(lg) for lg in member_logits(params)], axis=0))
  np.testing.assert_allclose(np.asarray(merged), want, atol=2e-5, rtol=0)
  for i in range(3):
    labels = np.asarray(batch["labels"][i, : batch["label_lens"][i]]).tolist()
    np.testing.assert_allclose(float(out["nll"][i]), numpy_ctc_nll(want[i, : int(input_lens[i])], labels), rtol=1e-5)


def test_summary_counts_the_diphone_head_at_full_size():
  """configs/gru_baseline.py: the 768 x 1601 head replaces the 768 x 41 one; 'both' adds the phoneme head back."""
  c = gru_baseline.get_config()
  c.model.targets, c.model.diphone_head = "diphone", "flat"
  counts = summary.parameter_counts(c)
  assert counts["out"] == 768 * 1601 + 1601 and counts["total"] == 44_315_177 + 768 * 1560 + 1560
  c.model.targets = "both"
  counts = summary.parameter_counts(c)
  assert counts["phoneme_out"] == 768 * 41 + 41 and counts["total"] == 44_315_177 + 769 * 1601
  c.model.diphone_head = "factored"  # adds the phoneme logits the context term is added to
  counts = summary.parameter_counts(c)
  assert counts["diphone_base"] == 768 * 41 + 41 and counts["total"] == 44_315_177 + 769 * 1601 + 769 * 41


def test_config_check_workdir_guard_and_export_know_the_targets(tmp_path):
  c = tiny_encoder("gru")
  c.model.targets, c.loss.phoneme_ctc_weight = "diphones", -1.0
  assert config_check.problems(c, n_devices=8, n_processes=1) == [
    "config.model.targets='diphones': expected one of phoneme, diphone, both",
    "config.loss.phoneme_ctc_weight=-1.0: must be >= 0",
  ]
  # A workdir written before targets existed trained phonemes: it still evaluates, and a diphone resume is refused.
  new_fields = ("model.targets", "loss.phoneme_ctc_weight", "loss.marginal_ctc_weight", "model.diphone_head")
  old = {k: v for k, v in workdir.flat_config(tiny_encoder("gru")).items() if k not in new_fields}
  assert workdir.config_differences(old, workdir.flat_config(tiny_encoder("gru"))) == []
  c.model.targets, c.loss.phoneme_ctc_weight = "diphone", 0.3
  assert workdir.config_differences(old, workdir.flat_config(c)) == [
    "loss.marginal_ctc_weight: 1.0 (workdir) -> 3.0 (now)",
    "model.diphone_head: 'flat' (workdir) -> 'factored' (now)",
    "model.targets: 'phoneme' (workdir) -> 'diphone' (now)",
  ]
  # model.diphone_head came later still: older diphone workdirs had a flat head, and a phoneme run ignores the field.
  old_diphone = {k: v for k, v in workdir.flat_config(c).items() if k != "model.diphone_head"}
  assert workdir.config_differences(old_diphone, workdir.flat_config(c)) == [
    "model.diphone_head: 'flat' (workdir) -> 'factored' (now)"
  ]
  flat = tiny_encoder("gru")
  flat.model.diphone_head, flat.loss.marginal_ctc_weight, flat.loss.phoneme_ctc_weight = "flat", 1.0, 0.5
  assert workdir.config_differences(workdir.flat_config(flat), workdir.flat_config(tiny_encoder("gru"))) == []
  flat.model.targets = "both"  # ... but a diphone run compares them: they shape its head and its loss
  both = tiny_encoder("gru")
  both.model.targets = "both"
  assert workdir.config_differences(workdir.flat_config(flat), workdir.flat_config(both)) == [
    "loss.marginal_ctc_weight: 1.0 (workdir) -> 3.0 (now)",
    "loss.phoneme_ctc_weight: 0.5 (workdir) -> 0.3 (now)",
    "model.diphone_head: 'flat' (workdir) -> 'factored' (now)",
  ]
  # The reference's checkpoint holds a phoneme model: a diphone workdir is refused by name, before anything is read.
  workdir.record_config(c, str(tmp_path))
  with pytest.raises(export.CheckpointExportError, match=r"config\.model\.targets='diphone': the reference's model"):
    export.export_workdir(str(tmp_path), str(tmp_path / "never"))
