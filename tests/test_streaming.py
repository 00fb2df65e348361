"""Streaming inference equals the offline eval-mode forward pass, for both model kinds, whatever the chunking."""

import functools
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn
from test_encoders import tiny_encoder

from b2t_jax.data.augment import preprocess
from b2t_jax.decoding.streaming import StreamingDecoder, geometry
from b2t_jax.models import create_model
from b2t_jax.patching import n_patches
from b2t_jax.steps import merge_log_probs

# fp32 everywhere; the two paths differ only in matmul shapes (summation order), measured max |diff| ~1e-6.
ATOL = 2e-5


@functools.cache  # one init per (kind, seed, ...) for the whole module
def _model_and_params(
  kind: str, seed: int = 0, patch_features: int = 0, encoder: str = "gru", targets: str = "phoneme"
):
  c = tiny_encoder(encoder, kind, intermediate=(0,) if encoder != "gru" else ())
  c.model.patch_features, c.model.targets = patch_features, targets
  c.data.sessions = c.data.sessions[:3]
  c.model.n_layers = 2  # fewer layers compile faster; the layer loop is the same code
  c.model.transformer.max_len = 40  # streaming KV cache of 40 patches: the 100-bin trial (22 patches) fits
  model = create_model(c)
  x = jnp.zeros((1, 64, c.data.n_features // c.data.feature_pool))
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed), x, jnp.zeros((1,), jnp.int32))["params"])
  # Non-trivial day layers: the identity/zero init would hide a transposed or wrongly gathered day matrix.
  rng = np.random.default_rng(seed)

  def perturb(path, a):
    name = jax.tree_util.keystr(path)
    return a + 0.1 * rng.normal(size=a.shape).astype(a.dtype) if "day_" in name else a

  return c, model, jax.tree_util.tree_map_with_path(perturb, params)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _forward(model, aug, params, x, day):
  x, _ = preprocess(None, x, jnp.zeros((1,), jnp.int32), aug)  # key=None: no augmentation, lengths unused
  return model.apply({"params": params}, x, day, train=False, mode="inference")


def _offline(c, model, params, raw, day, pad_to):
  """The eval path: pool (as the loader does), zero-pad to a bucket, smooth, inference-mode forward."""
  x = raw.reshape(raw.shape[0], -1, c.data.feature_pool).mean(-1)
  x = np.pad(x, ((0, pad_to - x.shape[0]), (0, 0)))[None]
  logits = _forward(model, ml_collections.FrozenConfigDict(c.aug), params, jnp.asarray(x), jnp.asarray([day]))
  return np.asarray(logits[0, : max(int(n_patches(raw.shape[0], c.model.patch_size, c.model.patch_stride)), 0)])


def _stream(decoder, raw, sizes):
  rows, start = [], 0
  for n in sizes:
    rows.append(decoder.feed(raw[start : start + n]))
    start += n
  rows.append(decoder.feed(raw[start:]))
  rows.append(decoder.finish())
  return np.concatenate(rows)


@pytest.mark.parametrize(
  "kind,patch_features,encoder,targets",
  [
    ("gru", 0, "gru", "phoneme"),
    ("triple", 0, "gru", "phoneme"),
    ("triple", 5, "gru", "phoneme"),
    ("gru", 0, "transformer", "phoneme"),
    ("triple", 0, "mamba2", "phoneme"),
    ("gru", 0, "gru", "both"),
  ],
)
def test_streaming_equals_offline(kind, patch_features, encoder, targets):
  """Every encoder streams (a transformer's KV cache, a Mamba-2 stack's conv and SSM states; both with an
  intermediate CTC head conditioning the stream) to the offline logits; diphone targets stream their 41 marginal
  log-probabilities."""
  c, model, params = _model_and_params(kind, patch_features=patch_features, encoder=encoder, targets=targets)
  if kind == "triple":  # the projection exists exactly when asked for
    assert ("proj" in params["noise_model"]["frontend"]) == bool(patch_features)
  rng = np.random.default_rng(1)
  decoder = StreamingDecoder(c, params, day=2)
  for t in (61, 14, 100):  # odd length (partial last chunk), exactly one patch, a multiple of the chunk
    raw = rng.normal(size=(t, c.data.n_features)).astype(np.float32) + 0.5
    want = _offline(c, model, params, raw, 2, pad_to=128)
    got = _stream(decoder, raw, [4] * (t // 4))  # 80 ms chunks, the real-time case
    assert got.shape == want.shape == ((t - 14) // 4 + 1, c.model.n_classes)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    assert np.abs(want).max() > 0.1
    # Ragged arrival (1, 7, 3, ... bins) must not change anything: the decoder re-chunks internally.
    ragged = _stream(decoder, raw, [1, 7, 3, 9, 2])
    np.testing.assert_allclose(ragged, got, atol=1e-6, rtol=0)


def test_streaming_larger_chunks_and_short_trial():
  c, model, params = _model_and_params("gru", seed=3)
  raw = np.random.default_rng(2).normal(size=(90, c.data.n_features)).astype(np.float32)
  decoder = StreamingDecoder(c, params, day=0, chunk_bins=12)
  np.testing.assert_allclose(
    _stream(decoder, raw, [12] * 7), _offline(c, model, params, raw, 0, 128), atol=ATOL, rtol=0
  )
  assert decoder.feed(raw[:13]).shape == (0, c.model.n_classes)  # shorter than one patch: nothing, ever
  assert decoder.finish().shape == (0, c.model.n_classes)


def test_rows_arrive_as_soon_as_their_bins_do():
  c, _, params = _model_and_params("gru")
  decoder = StreamingDecoder(c, params, day=0)
  raw = np.ones((200, c.data.n_features), np.float32)
  counts = [decoder.feed(raw[i : i + 4]).shape[0] for i in range(0, 200, 4)]
  # patch p needs raw bin 4p + 13 plus the 4-bin smoothing lag: the first row comes with bins 16..19
  assert counts[:5] == [0, 0, 0, 0, 1] and set(counts[4:]) == {1}


def test_bad_geometry_and_inputs_are_named():
  c, _, params = _model_and_params("gru")
  with pytest.raises(ValueError, match="multiple of config.model.patch_stride=4"):
    geometry(c, 6)
  decoder = StreamingDecoder(c, params, day=0)
  with pytest.raises(ValueError, match=r"expected bins of shape \(n, 512\)"):
    decoder.feed(np.zeros((4, 8), np.float32))
  with pytest.raises(ValueError, match="day 5 is outside"):
    StreamingDecoder(c, params, day=5)


def test_benchmark_tool_runs():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  p = subprocess.run(
    [
      sys.executable,
      "tools/benchmark_streaming.py",
      "--chunks=5",
      "--warmup=5",
      "--config.data.feature_pool=64",
      "--config.model.hidden=16",
      "--config.model.n_layers=1",
    ],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert p.returncode == 0, p.stderr[-3000:]
  assert "5 timed chunks, 6 logit rows emitted" in p.stdout and "per-chunk latency: median" in p.stdout
  # The streamed rows of whole trials against the offline pass: the figure the README's streaming table shows.
  diff = re.search(r"streamed vs offline logits: max \|diff\| (\S+) over 2 trial\(s\) of 500 bins", p.stdout)
  assert diff and 0 <= float(diff.group(1)) <= ATOL, p.stdout
  # tools/figures.py reads this output format for the README's streaming table.
  sys.path.insert(0, os.path.join(root, "tools"))
  import figures

  row = figures.table_streaming({"streaming": figures.Record("", p.stdout, "", 0.0)}).splitlines()[2]
  assert row.startswith("| gru, 10,193 params, float32 | 4 bins = 80 ms | 5 |") and diff.group(1) in row


def test_streaming_an_ensemble_gives_its_merged_log_probabilities():
  """Two members stacked (config.train.n_models=2): the streamed rows equal the offline merge of each member's
  logits (steps.merge_log_probs of the offline path)."""
  c, model, p0 = _model_and_params("gru", seed=0)
  _, _, p1 = _model_and_params("gru", seed=1)
  c = c.copy_and_resolve_references()
  c.train.n_models = 2
  raw = np.random.default_rng(3).normal(size=(97, c.data.n_features)).astype(np.float32)
  members = np.stack([_offline(c, model, p, raw, 1, 128) for p in (p0, p1)])
  decoder = StreamingDecoder(c, jax.tree.map(lambda a, b: jnp.stack([a, b]), p0, p1), day=1)
  np.testing.assert_allclose(_stream(decoder, raw, [5, 40, 52]), merge_log_probs(members, axis=0), atol=ATOL)
