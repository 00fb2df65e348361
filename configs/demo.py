"""A small triple model on freshly generated synthetic t15 data: trains on 2 CPU cores in a few minutes.

Same code paths as tpu_v4 (triple model, GRL, day layers, augmentation, CTC, checkpoints); only widths,
feature count (32 adjacent electrodes pooled into one) and schedule are reduced.
Launch: python -m b2t_jax.main --config=configs/demo.py --workdir=/tmp/b2t_demo
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.kind = "triple"
  c.data.feature_pool = 32            # 512 -> 16 features per bin; noise GRU width 14 * 16 = 224
  c.model.hidden = 128                # clean and noisy decoder width
  c.data.batch_size = 32
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
  return c
