"""Converts a PyTorch GRUDecoder / TripleGRUDecoder checkpoint into a b2t_jax workdir (config + orbax checkpoint).

  python tools/import_torch_checkpoint.py --checkpoint=trained_models/baseline_rnn/checkpoint/best_checkpoint \
      --out=runs/imported
  python -m b2t_jax.main --config=runs/imported/config.py --workdir=runs/imported --config.mode=eval \
      --config.data.data_dir=/data/hdf5_data_final

The checkpoint is read with torch.load(weights_only=True) (a checkpoint is untrusted input); `args.yaml` is read
from the checkpoint's folder unless --args names it. Key layouts: b2t_jax/torch_import/__init__.py.
"""

from __future__ import annotations

import sys

from absl import app, flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "torch.save file (reference format or a bare state dict)")
_OUT = flags.DEFINE_string("out", None, "workdir to create: OUT/config.py, OUT/best/, OUT/checkpoints/")
_ARGS = flags.DEFINE_string("args", None, "the run's args.yaml (default: args.yaml beside --checkpoint)")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _CHECKPOINT.value or not _OUT.value:
    raise app.UsageError("--checkpoint=PATH and --out=WORKDIR are required")
  from b2t_jax.torch_import import CheckpointImportError, import_checkpoint  # noqa: PLC0415
  from configs import default  # noqa: PLC0415

  try:
    info = import_checkpoint(_CHECKPOINT.value, _OUT.value, default.get_config(), _ARGS.value)
  except CheckpointImportError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for w in info["warnings"]:
    print(f"warning: {w}", file=sys.stderr)
  meta = "".join(f" {k}={info[k]:.4f}" for k in ("val_PER", "val_loss") if k in info)
  print(
    f"imported a {info['kind']} model ({info['params']:,} parameters{',' if meta else ''}{meta}) into {info['workdir']}"
  )
  print(f"config: {info['config']}")
  print(
    f"next: python -m b2t_jax.main --config={info['config']} --workdir={info['workdir']} "
    "--config.mode=eval --config.data.data_dir=DIR"
  )


if __name__ == "__main__":
  app.run(main)
