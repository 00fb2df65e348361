"""The reference's evaluation command, kept: a trained model's predicted sentences on val or test, as a CSV.

  python tools/evaluate_model.py --model_path trained_models/baseline_rnn --data_dir ../data/hdf5_data_final \
      --eval_type val [--lm_path lm.arpa]

`--model_path` is a b2t_jax workdir (e.g. the output_dir tools/train_model.py trained into; a reference PyTorch
checkpoint folder is imported first with tools/import_torch_checkpoint.py). It runs `mode=infer` on the
`--eval_type` split of `--data_dir` (an hdf5_data_final tree or a prepared dataset) with the workdir's recorded
config, which writes MODEL_PATH/infer_<split>/ (see the README), then writes the predicted sentences as the
reference does: MODEL_PATH/baseline_rnn_<eval_type>_predicted_sentences_YYYYMMDD_HHMMSS.csv, columns id,text,
ids 0..N-1 in session-list order, then file order. The words come from b2t_jax's lexicon beam search, with the
n-gram LM of --lm_path when given (the reference's come from its WFST language-model server). --csv_path and
--gpu_number are accepted and unused.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model_path", default="../data/t15_pretrained_rnn_baseline", help="the trained workdir")
  parser.add_argument("--data_dir", default="../data/hdf5_data_final", help="hdf5_data_final tree or prepared dataset")
  parser.add_argument("--eval_type", default="test", choices=["val", "test"], help="val (with PER/WER) or test")
  parser.add_argument("--lm_path", default="", help="word n-gram LM (ARPA, tools/build_lm.py); empty: lexicon only")
  parser.add_argument("--csv_path", default="", help="unused (the reference reads corpus names from it)")
  parser.add_argument("--gpu_number", type=int, default=1, help="unused (JAX uses the devices it finds)")
  args = parser.parse_args()

  from absl import app  # noqa: PLC0415 - after argparse: --help stays instant

  from b2t_jax import main as b2t_main  # noqa: PLC0415
  from b2t_jax import workdir as workdir_lib  # noqa: PLC0415

  model_path = args.model_path if "://" in args.model_path else os.path.abspath(args.model_path)  # orbax: absolute
  if not os.path.isfile(os.path.join(model_path, workdir_lib.CONFIG_FILE)):
    torch_ckpt = os.path.join(model_path, "checkpoint", "best_checkpoint")
    hint = (
      f"it holds a PyTorch checkpoint: import it first with python tools/import_torch_checkpoint.py "
      f"--checkpoint={torch_ckpt} --out=WORKDIR, then give --model_path WORKDIR"
      if os.path.isfile(torch_ckpt)
      else "give the output_dir a b2t_jax training run wrote (it holds config.json, best/ and checkpoints/)"
    )
    print(f"error: --model_path {model_path} is not a b2t_jax workdir; {hint}", file=sys.stderr)
    sys.exit(1)
  config = workdir_lib.recorded_config(
    model_path,
    {
      "mode": "infer",
      "infer.split": args.eval_type,
      "infer.out_dir": "",  # MODEL_PATH/infer_<split>
      "data.data_dir": os.path.abspath(args.data_dir) if "://" not in args.data_dir else args.data_dir,
      "decode.lm_path": args.lm_path,
    },
  )

  def evaluate(_) -> int:
    status = b2t_main.launch(config, model_path)
    if status:
      return status
    stamp = time.strftime("%Y%m%d_%H%M%S")
    out = os.path.join(model_path, f"baseline_rnn_{args.eval_type}_predicted_sentences_{stamp}.csv")
    shutil.copyfile(os.path.join(model_path, f"infer_{args.eval_type}", "submission.csv"), out)
    print(f"predicted sentences: {out}")
    return 0

  app.run(evaluate, argv=sys.argv[:1])


if __name__ == "__main__":
  main()
