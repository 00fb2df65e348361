"""Writes t15-format data from a generator that shares no code or design with b2t_jax.data.synthetic.

A check of the recipe on data we did not design (README, "What make demo trains"): four sessions with real
t15 names, the first train-only (as t15.2023.08.11 is); per trial a 6-dimensional articulatory latent that
steps to a per-phoneme target and is smoothed by a causal exponential filter (coarticulation); every one of
the 512 columns reads that latent through its own random weights, squashed by softplus, with per-column
scale and offset; each session perturbs the weights, scales and offsets by an amount that grows with its
distance from the first; heavy Gaussian noise. No pairing of columns, no arrays, no order.

It imports only numpy and h5py on purpose (nothing from this repository).

python tools/make_independent_t15.py --out=DIR [--seed=N]
"""

import argparse
import os

import h5py
import numpy as np

SESSIONS = ("t15.2023.08.11", "t15.2023.09.01", "t15.2023.10.20", "t15.2024.03.08")  # day indices 0, 6, 15, 29
TRAIN, VAL, TEST = 60, 20, 20
N_COLUMNS, N_LATENT, N_PHONEMES, WORD_BOUNDARY = 512, 6, 39, 40
NOISE = 1.5  # std of the additive Gaussian noise, per bin and column
DRIFT_PER_SESSION = 0.15  # relative weight perturbation added per step of session distance
SMOOTHING = 0.6  # exponential filter: z[t] = a * z[t-1] + (1 - a) * target[t]


def _pseudo_words(rng, n=60):
  """A random lexicon: n words of 2-5 phonemes (ids 1..39), spelt as letters a..z by their ids."""
  words = []
  for _ in range(n):
    phon = rng.integers(1, N_PHONEMES + 1, int(rng.integers(2, 6)))
    words.append((tuple(int(p) for p in phon), "".join(chr(97 + (p - 1) % 26) for p in phon)))
  return words


def _trial(rng, words, targets, w, scale, offset):
  chosen = [words[i] for i in rng.integers(len(words), size=int(rng.integers(3, 8)))]
  ids, frames = [], [np.zeros(N_LATENT)] * int(rng.integers(10, 30))
  for phon, _ in chosen:
    for p in phon:
      ids.append(p)
      frames += [targets[p]] * int(rng.integers(4, 10))
    ids.append(WORD_BOUNDARY)
    frames += [targets[WORD_BOUNDARY]] * int(rng.integers(2, 6))
  frames += [np.zeros(N_LATENT)] * int(rng.integers(10, 30))
  z, out = np.zeros(N_LATENT), []
  for f in frames:
    z = SMOOTHING * z + (1 - SMOOTHING) * f
    out.append(z)
  x = scale * np.logaddexp(0.0, np.asarray(out) @ w) + offset + NOISE * rng.standard_normal((len(out), N_COLUMNS))
  return x.astype(np.float32), ids, " ".join(s for _, s in chosen)


def _write(path, session, n, rng, words, targets, w, scale, offset, labelled):
  with h5py.File(path, "w") as f:
    for i in range(n):
      x, ids, text = _trial(rng, words, targets, w, scale, offset)
      g = f.create_group(f"trial_{i:04d}")
      g.create_dataset("input_features", data=x)
      g.attrs.update(n_time_steps=x.shape[0], session=session, block_num=1 + i // 10, trial_num=i % 10)
      if labelled:
        seq, chars = np.zeros(500, np.int32), np.zeros(500, np.int32)
        seq[: len(ids)] = ids
        chars[: len(text)] = [ord(c) for c in text]
        g.create_dataset("seq_class_ids", data=seq)
        g.create_dataset("transcription", data=chars)
        g.attrs.update(seq_len=len(ids), sentence_label=text)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--seed", type=int, default=2024)
  args = ap.parse_args()
  rng = np.random.default_rng(args.seed)
  words = _pseudo_words(rng)
  targets = 2.0 * rng.standard_normal((WORD_BOUNDARY + 1, N_LATENT))
  w0 = rng.standard_normal((N_LATENT, N_COLUMNS)) / np.sqrt(N_LATENT)
  scale0, offset0 = rng.lognormal(0.0, 0.3, N_COLUMNS), rng.normal(0.0, 1.0, N_COLUMNS)
  for k, session in enumerate(SESSIONS):
    w = w0 + DRIFT_PER_SESSION * k * rng.standard_normal(w0.shape) / np.sqrt(N_LATENT)
    scale = scale0 * np.exp(0.1 * k * rng.standard_normal(N_COLUMNS))
    offset = offset0 + 0.2 * k * rng.standard_normal(N_COLUMNS)
    folder = os.path.join(args.out, session)
    os.makedirs(folder, exist_ok=True)
    common = (rng, words, targets, w, scale, offset)
    _write(os.path.join(folder, "data_train.hdf5"), session, TRAIN, *common, True)
    if k:
      _write(os.path.join(folder, "data_val.hdf5"), session, VAL, *common, True)
      _write(os.path.join(folder, "data_test.hdf5"), session, TEST, *common, False)
  print(f"wrote {len(SESSIONS)} sessions to {args.out}")


if __name__ == "__main__":
  main()
