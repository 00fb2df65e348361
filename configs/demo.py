"""A small triple model on freshly generated synthetic t15 data: trains on 2 CPU cores in minutes.

Same code paths as tpu_v4 (triple model, GRL, day layers on all 512 features, augmentation, CTC, checkpoints).
Reduced: widths, batch (16) and schedule, and a learned projection (model.patch_features, not in SPEC) maps the
day layer's 512 outputs to 16 features before patching, so the noise GRU is 14 * 16 = 224 wide, not 7,168.
No feature pooling: every one of the 512 columns reaches the model, in whatever order the files hold them.
Launch: python -m b2t_jax.main --config=configs/demo.py --workdir=/tmp/b2t_demo

`--config=configs/demo.py:ENCODER` (gru, transformer or mamba2) is the demo with that encoder and the settings
the demo-size experiments chose for it (RECIPES; README, "Recipes, by experiment"), where
`--config.model.encoder=ENCODER` alone changes the stack only.
"""

from b2t_jax.config_check import ConfigError
from configs import default

# What the demo-size experiments chose per encoder, beyond the shared defaults (seed 10, 900 steps, val PER).
RECIPES = {
  "gru": {},
  "transformer": {},  # lr_peak 0.005 and 0.01 tie (0.084 / 0.083); 0.002 is worse (0.124)
  "mamba2": {"optim.lr_peak": 0.01},  # 0.061 against 0.075 at 0.005 on our generator, 0.013 against 0.017 on the other
}


def get_config(encoder: str = ""):
  """The demo config; `encoder` (the `:ENCODER` of --config=configs/demo.py:ENCODER): that encoder's recipe."""
  if encoder and encoder not in RECIPES:
    raise ConfigError(f"configs/demo.py:{encoder}: expected one of {', '.join(RECIPES)} (or nothing, the GRU demo)")
  c = default.get_config()
  c.model.kind = "triple"
  c.model.patch_features = 16  # Dense(512 -> 16) before patching: noise GRU width 14 * 16 = 224
  c.model.hidden = 128  # clean and noisy decoder width
  # Demo-size stacks of the other encoders (--config.model.encoder=transformer|mamba2), about the GRU's cost
  c.model.transformer.d_model = 128  # residual width
  c.model.transformer.n_heads = 4  # heads of width 32
  c.model.transformer.d_ff = 352  # SwiGLU width (~8/3 d_model)
  c.model.mamba2.d_model = 128  # residual width
  c.model.mamba2.d_state = 32  # state size per head
  c.model.mamba2.head_dim = 32  # 8 heads over the 256-wide inner stream
  c.model.mamba2.chunk_size = 32  # SSD chunk: demo trials have 15-50 patches
  c.data.batch_size = 16  # 4 days x 4 trials: the 512 x 512 day layers cost per trial-bin
  c.data.days_per_batch = 4
  c.data.eval_batch_size = 32
  c.data.time_buckets = (128, 192, 256, 384, 512)
  c.data.max_label_len = 64
  c.data.synthetic.n_sessions = 8
  c.data.synthetic.trials_per_session = 80
  c.optim.warmup_steps = c.optim.day_warmup_steps = 50
  c.train.num_steps = 1200
  c.optim.decay_steps = 1200
  c.train.eval_every = 300
  c.train.log_every = 50
  c.train.checkpoint_every = 300
  if encoder:
    c.model.encoder = encoder
    c.update_from_flattened_dict(RECIPES[encoder])
  return c
