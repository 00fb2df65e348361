"""The TripleGRUDecoder TPU variant (SPEC §3.4, §4): 8 TPU v4 cores, 32 trials per core, bf16, 2 micro-batches.

Launch on every host of the slice, on the dataset prepared once by tools/prepare_data.py --data_dir=gs://...:
  python -m b2t_jax.main --config=configs/tpu_v4.py --workdir=gs://BUCKET/run \
      --config.data.data_dir=gs://BUCKET/t15_tfds --config.distributed=True
"""

from configs import default


def get_config():
  c = default.get_config()
  c.model.kind = "triple"
  c.model.dtype = "bfloat16"  # bf16 matmul inputs; params, GRU carry/gates and CTC in fp32
  c.data.batch_size = 512  # 32 trials per core x 8 cores x 2 accumulated micro-batches
  c.data.days_per_batch = 16  # keeps 32 trials per day, as many as a day of t15 reasonably offers
  c.data.eval_batch_size = 256  # 32 per core
  c.optim.grad_accum_steps = 2  # two micro-batches of 256 per optimizer step
  c.mesh_shape = (-1, 1)  # data parallel over the 8 cores
  return c
