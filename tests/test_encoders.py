"""The encoder switch (config.model.encoder), intermediate CTC and the time-domain augmentations, through the
decoders, the losses, the config check and the workdir guard. The stacks themselves: test_gru.py,
test_transformer.py, test_mamba2.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import linen as nn
from test_losses import numpy_ctc_nll

from b2t_jax import config_check, losses, summary, workdir
from b2t_jax.data import augment
from b2t_jax.models import create_model
from configs import demo, gru_baseline


def tiny_encoder(encoder: str, kind: str = "gru", intermediate=()):
  """The tiny test config with a small stack of `encoder`'s kind (2 layers, width 16)."""
  c = tiny_config()
  c.model.kind, c.model.encoder, c.model.n_layers = kind, encoder, 2
  c.model.clean_layers = 2
  c.model.transformer.d_model, c.model.transformer.n_heads, c.model.transformer.d_ff = 16, 2, 32
  c.model.mamba2.d_model, c.model.mamba2.d_state, c.model.mamba2.head_dim = 16, 8, 8
  c.model.mamba2.chunk_size = 8
  c.model.intermediate_ctc = intermediate
  return c


@pytest.mark.parametrize(
  "encoder,total",
  [("gru", 44_315_177), ("transformer", 41_836_201), ("mamba2", 43_702_477)],
)
def test_full_size_encoders_sit_in_the_gru_baselines_parameter_range(encoder, total):
  """configs/gru_baseline.py with --config.model.encoder=...: the same day layers and head, a stack of each kind in
  the 44M range (the SPEC GRU exactly)."""
  c = gru_baseline.get_config()
  c.model.encoder = encoder
  counts = summary.parameter_counts(c)
  assert counts["total"] == total
  width = {"gru": 768, "transformer": 640, "mamba2": 896}[encoder]
  assert counts["frontend"] == 11_819_520 and counts["out"] == width * 41 + 41


@pytest.mark.parametrize("encoder", ["transformer", "mamba2"])
def test_demo_switches_to_a_demo_size_stack_of_each_kind(encoder):
  c = demo.get_config()
  base = summary.parameter_counts(c)["total"]
  c.model.encoder = encoder
  counts = summary.parameter_counts(c)
  assert abs(counts["total"] - base) < 0.05 * base  # the same budget as the GRU demo, within 5%
  # the noise stack keeps the patch width (14 x 16): what the clean stack subtracts
  model = create_model(c)
  x, day = jnp.zeros((1, 64, 512)), jnp.zeros((1,), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.PRNGKey(0), x, day)["params"]))
  out = jax.eval_shape(lambda p: model.apply({"params": p}, x, day, mode="full"), params)
  assert out["noise"].shape == (1, 13, 224) and out["logits"].shape == out["noisy_logits"].shape == (1, 13, 41)


def test_demo_recipes_set_the_encoder_and_what_the_experiments_chose():
  assert demo.get_config("gru").to_dict() == demo.get_config().to_dict()
  tfm, mamba = demo.get_config("transformer"), demo.get_config("mamba2")
  assert (tfm.model.encoder, tfm.optim.lr_peak) == ("transformer", 0.005)
  assert (mamba.model.encoder, mamba.optim.lr_peak, mamba.optim.day_lr_peak) == ("mamba2", 0.01, 0.005)
  with pytest.raises(ValueError, match=r"configs/demo.py:mamba: expected one of gru, transformer, mamba2"):
    demo.get_config("mamba")


def _apply_full(c, seed=0):
  model = create_model(c)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((3, 60, 8)), jnp.float32)
  day = jnp.array([0, 1, 2], jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), x, day)["params"])
  return model, params, x, day


@pytest.mark.parametrize("encoder", ["gru", "transformer", "mamba2"])
def test_intermediate_ctc_heads_condition_the_stream_and_enter_the_loss(encoder):
  """One head after layer 0 of a 2-layer stack: its logits come out in 'full' mode, its posteriors change what
  layer 1 reads (so the final logits depend on the head's weights), inference returns the final logits only, and
  the loss is CTC(final) + w * CTC(intermediate) against a NumPy CTC."""
  c = tiny_encoder(encoder, intermediate=(0,))
  model, params, x, day = _apply_full(c)
  assert set(params["ictc_0"]) == {"norm", "head", "condition"}
  full = jax.jit(lambda p: model.apply({"params": p}, x, day, mode="full"))
  out = full(params)
  (inter,) = out["intermediate"]
  assert inter.shape == out["logits"].shape == (3, 12, 41) and inter.dtype == jnp.float32
  np.testing.assert_allclose(model.apply({"params": params}, x, day), out["logits"], atol=1e-5)
  bumped = jax.tree_util.tree_map_with_path(
    lambda path, a: a + 0.5 if "condition" in jax.tree_util.keystr(path) else a, params
  )
  assert np.abs(np.asarray(full(bumped)["logits"]) - np.asarray(out["logits"])).max() > 1e-3

  labels = np.array([[3, 5, 40, 7, 0], [9, 40, 0, 0, 0], [1, 2, 3, 4, 40]], np.int32)
  label_lens, input_lens = np.array([4, 2, 5], np.int32), np.array([12, 9, 11], np.int32)  # as the pipeline feeds them
  loss, aux = losses.decoder_loss(
    out, input_lens, labels, label_lens, jnp.ones(3), noisy_weight=0.2, noise_l2_weight=0.0, intermediate_weight=0.3
  )

  def ctc(lg):
    lg = np.asarray(lg, np.float64)
    return np.mean([numpy_ctc_nll(lg[i, : input_lens[i]], labels[i, : label_lens[i]].tolist()) for i in range(3)])

  np.testing.assert_allclose(float(aux["ctc_intermediate"]), ctc(inter), rtol=1e-5)
  np.testing.assert_allclose(float(loss), ctc(out["logits"]) + 0.3 * ctc(inter), rtol=1e-5)


def test_analytic_flops_count_every_encoder_and_head():
  """forward_flops against XLA's count for the tiny transformer and Mamba-2 decoders with an intermediate head
  (the GRU's: test_benchmark.py). XLA also counts elementwise work, the masked half of the attention scores and the
  SSD's masked scores and segment sums, so it may only exceed the analytic matmul count, by a bounded share."""
  for encoder, kind, bound, targets in (("transformer", "gru", 1.25, "phoneme"), ("mamba2", "triple", 1.2, "both")):
    c = tiny_encoder(encoder, kind, intermediate=(0,))
    c.model.targets = targets  # the triple: a 1601-way clean head, the auxiliary phoneme head and the noisy one
    # elementwise work is a large share at width 16 (SSD: 1.35x); at 64 the matmuls dominate (measured 1.12x;
    # 1.10x with the diphone heads)
    c.model.mamba2.d_model, c.model.mamba2.d_state, c.model.mamba2.head_dim = 64, 32, 32
    model, params, x, day = _apply_full(c)
    xla = jax.jit(lambda p: model.apply({"params": p}, x, day, mode="full")).lower(params).compile()
    flops = xla.cost_analysis()["flops"]
    analytic = 3 * summary.forward_flops(c, 60)
    assert analytic <= flops <= bound * analytic, (encoder, flops / analytic)


def test_config_check_names_bad_encoder_settings():
  c = tiny_encoder("transformer")
  assert config_check.problems(c, n_devices=8, n_processes=1) == []
  c.model.transformer.n_heads = 3
  c.model.intermediate_ctc = (1,)  # the last of 2 layers: nothing after it to condition
  found = config_check.problems(c, n_devices=8, n_processes=1)
  assert found == [
    "config.model.transformer.n_heads=3: must divide d_model=16 into heads of even width (RoPE rotates pairs)",
    "config.model.intermediate_ctc=(1,): give distinct layer indices of the speech stack before its last layer "
    "(0..0: config.model.n_layers=2)",
  ]
  c = tiny_encoder("lstm")
  assert config_check.problems(c, n_devices=8, n_processes=1) == [
    "config.model.encoder='lstm': expected one of gru, transformer, mamba2"
  ]
  c = tiny_encoder("gru", intermediate=(0,))
  c.model.gru_wavefront = True
  assert "needs the layer-by-layer GRU" in config_check.problems(c, n_devices=8, n_processes=1)[0]
  c = tiny_encoder("mamba2")
  c.model.mamba2.head_dim = 5  # the transformer's sub-config is not checked while the run does not use it
  c.model.transformer.n_heads = 3
  assert config_check.problems(c, n_devices=8, n_processes=1) == [
    "config.model.mamba2.head_dim=5 must divide d_inner = expand * d_model = 32 (the heads split the inner width)"
  ]


def test_workdir_guard_compares_only_the_encoder_in_use():
  rec = workdir.flat_config(tiny_encoder("gru"))
  other = tiny_encoder("gru")
  other.model.transformer.d_model = 64  # unused by a GRU run: free to differ
  assert workdir.config_differences(rec, workdir.flat_config(other)) == []
  other.model.encoder = "transformer"
  assert workdir.config_differences(rec, workdir.flat_config(other)) == [
    "model.encoder: 'gru' (workdir) -> 'transformer' (now)",
    "model.transformer.d_model: 16 (workdir) -> 64 (now)",
  ]
  # A workdir written before encoders existed ran the GRU with none of the new augmentations or heads.
  old = {k: v for k, v in rec.items() if not k.startswith(("model.transformer.", "model.mamba2."))}
  old = {k: v for k, v in old.items() if k not in workdir.ADDED_LATER}
  assert workdir.config_differences(old, workdir.flat_config(tiny_encoder("gru"))) == []
  assert workdir.config_differences(old, workdir.flat_config(tiny_encoder("gru", intermediate=(0,)))) == [
    "model.intermediate_ctc: [] (workdir) -> [0] (now)"
  ]


# ----------------------------------------------------------------------------------------- time augmentations


@pytest.mark.parametrize("fraction,max_bins", [(0.2, 10), (0.6, 20)])
def test_time_mask_covers_the_expected_fraction_in_spans(fraction, max_bins):
  masked = np.asarray(augment.time_mask_spans(jax.random.PRNGKey(0), (64, 2000), fraction, max_bins))
  edge = 2 * max_bins  # the first bins have fewer earlier starts that could cover them
  share = masked[:, edge:].mean()
  assert abs(share - fraction) < 0.01, share  # 64 x 2000 bins: the standard error is ~0.002
  # masks come in spans: a masked bin's neighbour is masked far more often than the coverage alone would give
  neighbour = masked[:, edge:-1][masked[:, edge + 1 :]].mean()
  assert neighbour > fraction + 0.5 * (1 - fraction), neighbour


def test_time_jitter_shifts_and_stretches_with_lengths_following():
  t = 64
  ramp = np.tile(np.arange(t, dtype=np.float32)[None, :, None], (2, 1, 3))
  lengths = jnp.array([40, 50])
  x = jnp.asarray(ramp * (np.arange(t)[None, :, None] < np.array([40, 50])[:, None, None]))
  key = jax.random.PRNGKey(3)
  shift = int(jax.random.randint(jax.random.split(key)[0], (2,), -5, 6)[0])
  y, new = augment.time_jitter(key, x, lengths, 5, 0.0)
  y = np.asarray(y)
  k = shift
  assert int(new[0]) == 40 + k  # a pure shift moves the end by k bins
  valid = np.arange(int(new[0]))
  want = np.where(valid - k >= 0, valid - k, 0).astype(np.float32)
  np.testing.assert_allclose(y[0, valid, 0], want, atol=1e-6)
  assert np.all(y[0, int(new[0]) :] == 0)
  # stretch only, by f ~ U[0.7, 1.3]: the ramp's slope becomes 1 / f and the length follows (last bin at 49 f)
  key = jax.random.PRNGKey(4)
  f = 1.0 + 0.3 * float(jax.random.uniform(jax.random.split(key)[1], (2,), minval=-1.0, maxval=1.0)[1])
  y, new = augment.time_jitter(key, x, lengths, 0, 0.3)
  y, n = np.asarray(y), int(new[1])
  assert n == int(np.floor(49 * f)) + 1 and n != 50
  np.testing.assert_allclose(y[1, :n, 0], np.arange(n) / f, rtol=1e-5, atol=1e-4)
  assert np.all(y[1, n:] == 0)


def test_time_augmentations_are_train_only_and_deterministic_per_key():
  c = tiny_config().aug
  c.time_mask_fraction, c.time_jitter_shift_bins, c.time_jitter_stretch = 0.5, 4, 0.2
  x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 128, 8)), jnp.float32)
  lengths = jnp.array([128, 100, 90, 60])
  off = tiny_config().aug
  ev, ev_len = augment.preprocess(None, x, lengths, c)
  ev_off, _ = augment.preprocess(None, x, lengths, off)
  np.testing.assert_array_equal(ev, ev_off)  # eval is untouched by the knobs
  np.testing.assert_array_equal(ev_len, lengths)
  a = augment.preprocess(jax.random.PRNGKey(1), x, lengths, c)
  b = augment.preprocess(jax.random.PRNGKey(1), x, lengths, c)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  other = augment.preprocess(jax.random.PRNGKey(2), x, lengths, c)
  assert not np.array_equal(a[0], other[0])
  zeros = np.asarray(a[0] == 0).all(-1)
  inside = np.arange(128)[None, :] < np.asarray(a[1])[:, None]
  assert 0.35 < zeros[inside].mean() < 0.65  # about half of each trial's bins masked
  # with the knobs off, training draws exactly what it drew before they existed
  base = augment.preprocess(jax.random.PRNGKey(1), x, lengths, off)
  old = augment.augment(jax.random.PRNGKey(1), x, lengths, off)
  np.testing.assert_array_equal(base[1], old[1])
  np.testing.assert_allclose(
    base[0], augment.smooth(old[0], augment.gaussian_kernel(off.smooth_kernel_std, 100, 0.01)), rtol=0, atol=0
  )
