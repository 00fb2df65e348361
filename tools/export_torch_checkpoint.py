"""Writes a b2t_jax workdir as a reference PyTorch checkpoint folder (the inverse of import_torch_checkpoint.py).

  python tools/export_torch_checkpoint.py --workdir=runs/baseline --out=trained_models/exported
  # -> trained_models/exported/checkpoint/best_checkpoint and .../checkpoint/args.yaml, as the reference's
  #    trainer lays them out; its evaluate_model.py takes --model_path trained_models/exported

The best checkpoint (else the latest) of a `gru` workdir becomes the GRUDecoder state dict (SPEC §6) with the
reference's AdamW/LambdaLR states; a `triple` workdir, the layout tools/import_torch_checkpoint.py reads.
Refused, by name: what the reference cannot hold (model.patch_features != 0, data.feature_pool != 1,
train.n_models > 1, an encoder other than the GRU, targets other than phonemes). Details:
b2t_jax/torch_import/export.py.
"""

from __future__ import annotations

import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "the b2t_jax workdir to export (config.json, best/, checkpoints/)")
_OUT = flags.DEFINE_string("out", None, "the reference folder to write: OUT/checkpoint/{best_checkpoint,args.yaml}")
_COMPILED = flags.DEFINE_bool(
  "compiled_prefix",
  False,
  "prefix keys with '_orig_mod.' as a torch.compile'd model saves them (the reference trainer's "
  "init_from_checkpoint loads into its compiled model); its evaluate_model.py reads either",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir=WORKDIR and --out=DIR are required")
  from b2t_jax.checkpoint import CheckpointError  # noqa: PLC0415
  from b2t_jax.torch_import.export import COMPILED_PREFIX, CheckpointExportError, export_workdir  # noqa: PLC0415

  try:
    info = export_workdir(_WORKDIR.value, _OUT.value, key_prefix=COMPILED_PREFIX if _COMPILED.value else "")
  except (CheckpointExportError, CheckpointError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(
    f"exported a {info['kind']} model ({info['params']:,} parameters, step {info['step']}, "
    f"val_PER={info['val_PER']:.4f} val_loss={info['val_loss']:.4f}) to {info['checkpoint']}"
  )
  print(f"args: {info['args']}")


if __name__ == "__main__":
  app.run(main)
