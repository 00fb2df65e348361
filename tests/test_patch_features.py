"""model.patch_features: the opt-in Dense(n_features -> F) before patching (the demo's way to fit 2 CPU cores).

Off by default, where every shipped config but the demo keeps its SPEC parameter count (tests/test_models.py).
"""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from b2t_jax.models import create_model
from b2t_jax.summary import parameter_counts
from configs import default, demo


def _small(kind: str, patch_features: int):
  c = default.get_config()
  c.model.kind, c.model.hidden, c.model.n_layers, c.model.patch_features = kind, 8, 1, patch_features
  c.data.sessions = c.data.sessions[:2]
  return c


@pytest.mark.parametrize("kind", ["gru", "triple"])
def test_projection_narrows_patches_and_costs_exactly_its_dense(kind):
  f = 6
  off, on = _small(kind, 0), _small(kind, f)
  x, day = jnp.zeros((2, 30, 512)), jnp.zeros((2,), jnp.int32)
  params = nn.unbox(create_model(on).init(jax.random.PRNGKey(0), x, day)["params"])
  front = params["frontend"] if kind == "gru" else params["noise_model"]["frontend"]
  assert front["proj"]["kernel"].shape == (512, f)  # every one of the 512 columns feeds it
  out = create_model(on).apply({"params": params}, x, day, mode="full" if kind == "triple" else "inference")
  if kind == "triple":
    clean, noisy, noise = out["logits"], out["noisy_logits"], out["noise"]
    assert noise.shape == (2, 5, 14 * f) and clean.shape == noisy.shape == (2, 5, 41)
  else:
    assert out.shape == (2, 5, 41)
  # The GRUs that read patches shrink from 14 * 512 to 14 * f inputs; the front end gains the Dense.
  n_off, n_on = parameter_counts(off)["total"], parameter_counts(on)["total"]
  fronts = 1 if kind == "gru" else 2
  gru_in = 3 * 8 * 14 * (512 - f)  # first GRU layer's input kernel, clean (or baseline)
  if kind == "triple":
    gru_in += 3 * 8 * 14 * (512 - f)  # the noisy decoder reads the noise, as wide as a patch
    w_off, w_on = 14 * 512, 14 * f  # noise GRU: 2 layers, width = patch width
    gru_in += 2 * (3 * w_off * w_off * 2 + 3 * w_off * 2 + w_off) - 2 * (3 * w_on * w_on * 2 + 3 * w_on * 2 + w_on)
    gru_in -= w_off - w_on  # h0 counted once per stack, not per layer
  assert n_off - n_on == gru_in - fronts * (512 * f + f)


def test_demo_uses_every_column_and_negative_width_is_refused():
  c = demo.get_config()
  assert c.data.feature_pool == 1 and c.model.patch_features > 0
  c.model.patch_features = -1
  with pytest.raises(ValueError, match="patch_features=-1"):
    create_model(c)
