"""A learnable synthetic stand-in for the t15 release, written in exactly its HDF5 layout (SPEC §1).

It assumes nothing about column order that a real array does not give. The generative model:

- Sentences come from a small built-in lexicon and a sparse word grammar (each word has a few possible
  successors, drawn once from the seed), so a word n-gram LM trained on the train sentences knows something
  the neural data do not, as a real corpus LM does.
- Articulation: a low-dimensional latent space (`n_latent` dimensions). Each phoneme class has a smooth latent
  trajectory over `pattern_bins` 20 ms bins; a trial's latent is the sum of its phonemes' trajectories at
  their onsets (3-7 bins apart in the demo profile), so neighbouring phonemes overlap (coarticulation).
- Electrodes: 256, on four 64-electrode arrays in the t15 order (ventral 6v, area 4, 55b, dorsal 6v). Each
  electrode reads the latent through its own random weight vector (i.i.d. across electrodes: no locality,
  neighbouring columns share nothing but their array), scaled by its array's informativeness
  (`ARRAY_INFORMATIVENESS`: dorsal 6v carries almost no speech signal, as in t15).
- Columns 0-255 are threshold crossings of electrodes 0-255: non-negative Poisson counts per bin of a rate
  `base * day_gain * exp(tx_depth * drive)`. Columns 256-511 are the spike-band power of the same electrodes:
  a continuous, non-negative value that follows the same drive and the same electrode's count fluctuation,
  plus Gaussian noise (`noise_std`).
- Normalisation: as in the release ("normalized (z-scored) based on the preceding 20 trials", its Dryad
  README), every column of a file is z-scored with the mean and std of the 20 trials before it, so the counts
  reach the model as z-scores; much of a day's gain and offset change is normalised away, its tuning is not.
- Days: each electrode's tuning rotates from its day-0 weights towards a second random direction by an angle
  that grows with the day's position in the session list (up to `tuning_drift` radians at the last session);
  rate gain and SBP offset drift linearly with that position too, plus day-specific jitter.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import h5py
import numpy as np

from b2t_jax.data.t15 import TRIAL_FMT
from b2t_jax.vocab import PHONEMES, SIL_ID

# word -> ARPAbet without stress; together they cover all 39 phonemes.
LEXICON = {
  "i": "AY",
  "you": "Y UW",
  "we": "W IY",
  "they": "DH EY",
  "he": "HH IY",
  "she": "SH IY",
  "the": "DH AH",
  "a": "AH",
  "is": "IH Z",
  "to": "T UW",
  "and": "AE N D",
  "of": "AH V",
  "in": "IH N",
  "that": "DH AE T",
  "have": "HH AE V",
  "for": "F AO R",
  "not": "N AA T",
  "with": "W IH DH",
  "do": "D UW",
  "say": "S EY",
  "good": "G UH D",
  "know": "N OW",
  "want": "W AA N T",
  "think": "TH IH NG K",
  "water": "W AO T ER",
  "please": "P L IY Z",
  "thank": "TH AE NG K",
  "yes": "Y EH S",
  "help": "HH EH L P",
  "my": "M AY",
  "family": "F AE M AH L IY",
  "today": "T AH D EY",
  "time": "T AY M",
  "home": "HH OW M",
  "very": "V EH R IY",
  "much": "M AH CH",
  "go": "G OW",
  "come": "K AH M",
  "see": "S IY",
  "like": "L AY K",
  "need": "N IY D",
  "feel": "F IY L",
  "tired": "T AY ER D",
  "happy": "HH AE P IY",
  "juice": "JH UW S",
  "pleasure": "P L EH ZH ER",
  "boy": "B OY",
  "how": "HH AW",
  "out": "AW T",
  "thing": "TH IH NG",
  "red": "R EH D",
  "book": "B UH K",
  "car": "K AA R",
  "watch": "W AA CH",
  "put": "P UH T",
  "school": "S K UW L",
  "brother": "B R AH DH ER",
  "bird": "B ER D",
  "voice": "V OY S",
  "zoo": "Z UW",
  "shoe": "SH UW",
  "eat": "IY T",
  "now": "N AW",
  "what": "W AH T",
  "right": "R AY T",
  "talk": "T AO K",
  "morning": "M AO R N IH NG",
  "outside": "AW T S AY D",
  "music": "M Y UW Z IH K",
  "doctor": "D AA K T ER",
  "call": "K AO L",
  "nurse": "N ER S",
  "bed": "B EH D",
  "cold": "K OW L D",
  "warm": "W AO R M",
}
_PHONEME_ID = {p: i for i, p in enumerate(PHONEMES)}
# Trial-length profiles: [low, high) ranges of words per sentence and of 20 ms bins per phoneme, per word
# boundary and before/after speech. 'demo' keeps trials short (1.5-4 s) so the demo trains in minutes; 't15'
# mimics the release's spread (about 2-30 s, ~2 s per attempted word) for bucketing measurements.
LENGTH_PROFILES = {
  "demo": {"words": (3, 8), "phoneme_bins": (3, 7), "boundary_bins": (2, 4), "edge_bins": (8, 20)},
  "t15": {"words": (2, 13), "phoneme_bins": (10, 30), "boundary_bins": (10, 40), "edge_bins": (25, 75)},
}
N_SILENT_SESSIONS = (0, 28, 32, 33)  # t15 sessions without val/test files (SPEC §1)
ELECTRODES_PER_ARRAY = 64
# Tuning strength of each array, in column order (ventral 6v, area 4, 55b, dorsal 6v): in t15 the ventral
# arrays carry most of the speech signal and dorsal 6v almost none.
ARRAY_INFORMATIVENESS = (1.0, 0.6, 0.8, 0.1)


def sentence_to_ids(words: list[str]) -> list[int]:
  """Phoneme ids of a sentence with the word-boundary token after every word."""
  ids = []
  for w in words:
    ids += [_PHONEME_ID[p] for p in LEXICON[w].split()] + [SIL_ID]
  return ids


class SyntheticT15:
  """Deterministic generator: tuning and day drift are fixed by the seed; trials are drawn from it."""

  n_latent = 10  # articulatory latent dimensions
  pattern_bins = 6  # a phoneme's latent trajectory spans this many 20 ms bins
  latent_scale = 1.2  # std of a phoneme trajectory's latent values (before the Hann taper)
  tx_depth = 0.5  # log-rate modulation of a threshold-crossing rate per unit of drive
  base_rate = (0.3, 2.5)  # [low, high) of an electrode's mean threshold crossings per 20 ms bin
  sbp_base = (1.0, 3.0)  # [low, high) of an electrode's mean spike-band power (arbitrary units)
  sbp_depth = 0.6  # spike-band power change per unit of drive
  sbp_tx_coupling = 0.2  # spike-band power per unit of the same electrode's standardised count fluctuation
  tuning_drift = 1.0  # radians the tuning of a typical electrode has rotated by at the last session
  gain_drift = 0.4  # log-gain of rates drifts up to +/- this over the session list
  offset_drift = 0.5  # spike-band power offset drifts up to +/- this over the session list
  successors = 4  # words that may follow a given word (the grammar's branching factor)
  grammar_stream = 99  # PRNG stream of the grammar, apart from the neural tuning's

  def __init__(self, seed: int = 0, *, n_features=512, n_days_total=45, noise_std=1.0, length_profile="demo"):
    if length_profile not in LENGTH_PROFILES:
      raise ValueError(
        f"length_profile={length_profile!r}: expected one of {sorted(LENGTH_PROFILES)} "
        "(config.data.synthetic.length_profile)"
      )
    if n_features % (2 * ELECTRODES_PER_ARRAY):
      raise ValueError(
        f"n_features={n_features}: must be 2 x electrodes, a multiple of {2 * ELECTRODES_PER_ARRAY} "
        "(threshold crossings then spike-band power of whole 64-electrode arrays)"
      )
    self.lengths = LENGTH_PROFILES[length_profile]
    self.n_features, self.n_days_total, self.noise_std = n_features, n_days_total, noise_std
    self.n_electrodes = n_e = n_features // 2
    rng = np.random.default_rng(seed)
    taper = np.hanning(self.pattern_bins + 2)[1:-1, None]
    self.patterns = self.latent_scale * rng.standard_normal((len(PHONEMES), self.pattern_bins, self.n_latent)) * taper
    array = np.arange(n_e) // ELECTRODES_PER_ARRAY % len(ARRAY_INFORMATIVENESS)
    strength = np.asarray(ARRAY_INFORMATIVENESS)[array, None] / np.sqrt(self.n_latent)
    self.tuning = rng.standard_normal((n_e, self.n_latent)) * strength  # day-0 weights
    self.tuning_target = rng.standard_normal((n_e, self.n_latent)) * strength  # direction the drift turns to
    self.drift_angle = self.tuning_drift * rng.uniform(0.5, 1.5, n_e)
    self.log_base_rate = np.log(rng.uniform(*self.base_rate, n_e))
    self.sbp_level = rng.uniform(*self.sbp_base, n_e)
    self.drift_gain = rng.uniform(-self.gain_drift, self.gain_drift, n_e)
    self.drift_offset = rng.uniform(-self.offset_drift, self.offset_drift, n_e)
    self.words = sorted(LEXICON)
    grammar = np.random.default_rng([seed, self.grammar_stream])
    self.next_words = [grammar.choice(len(self.words), self.successors, replace=False) for _ in self.words]
    self.next_probs = [grammar.dirichlet(np.ones(self.successors)) for _ in self.words]

  def sentence(self, rng: np.random.Generator, n_words: int) -> list[str]:
    """A first word uniformly from the lexicon, then each next word from its predecessor's successors."""
    w = int(rng.integers(len(self.words)))
    out = [w]
    for _ in range(n_words - 1):
      w = int(rng.choice(self.next_words[w], p=self.next_probs[w]))
      out.append(w)
    return [self.words[i] for i in out]

  def day_transform(self, day: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The day's electrode tuning (n_e, n_latent), log rate gain and spike-band power offset (n_e,)."""
    frac = day / max(self.n_days_total - 1, 1)
    angle = (self.drift_angle * frac)[:, None]
    tuning = np.cos(angle) * self.tuning + np.sin(angle) * self.tuning_target
    log_gain = self.drift_gain * frac + 0.05 * rng.standard_normal(self.n_electrodes)
    offset = self.drift_offset * frac + 0.1 * rng.standard_normal(self.n_electrodes)
    return {"tuning": tuning, "log_gain": log_gain, "offset": offset}

  def layout(self, rng: np.random.Generator) -> tuple[list[str], list[int], list[int], int, int]:
    """A sentence and its timing: (words, phoneme ids, bins per phoneme, lead bins, total bins)."""
    p = self.lengths
    words = self.sentence(rng, int(rng.integers(*p["words"])))
    ids = sentence_to_ids(words)
    durations = [
      int(rng.integers(*p["boundary_bins"])) if i == SIL_ID else int(rng.integers(*p["phoneme_bins"])) for i in ids
    ]
    lead, tail = int(rng.integers(*p["edge_bins"])), int(rng.integers(*p["edge_bins"]))
    return words, ids, durations, lead, lead + sum(durations) + tail + self.pattern_bins

  def trial_lengths(self, rng: np.random.Generator, n: int) -> np.ndarray:
    """The lengths in bins of `n` trials drawn from the length profile (layouts only, no features)."""
    return np.array([self.layout(rng)[-1] for _ in range(n)])

  def trial(self, rng: np.random.Generator, day: dict[str, np.ndarray]):
    """One trial before normalisation: (features (T, n_features), phoneme ids, sentence)."""
    words, ids, durations, lead, t = self.layout(rng)
    latent = np.zeros((t, self.n_latent))
    onset = lead
    for i, d in zip(ids, durations):
      latent[onset : onset + self.pattern_bins] += self.patterns[i]
      onset += d
    drive = latent @ day["tuning"].T  # (T, electrodes)
    rate = np.exp(self.log_base_rate + day["log_gain"] + self.tx_depth * drive)
    tx = rng.poisson(rate)
    fluctuation = (tx - rate) / np.sqrt(rate)
    sbp = (
      self.sbp_level
      + day["offset"]
      + self.sbp_depth * drive
      + self.sbp_tx_coupling * fluctuation
      + self.noise_std * rng.standard_normal(drive.shape)
    )
    x = np.concatenate([tx, np.maximum(sbp, 0.0)], axis=1)
    return x, ids, " ".join(words)


class RunningZScore:
  """Normalises each column by the mean and std of the preceding `window` trials, as the release does.

  (The t15 release's features are "normalized (z-scored) based on the preceding 20 trials"; the first trial of
  a file, which has none before it, is normalised by its own statistics.)
  """

  def __init__(self, window: int = 20, eps: float = 1e-3):
    self.window, self.eps, self.history = window, eps, []

  def __call__(self, x: np.ndarray) -> np.ndarray:
    past = self.history[-self.window :] or [(x.shape[0], x.sum(0), np.square(x).sum(0))]
    n = sum(h[0] for h in past)
    mean = sum(h[1] for h in past) / n
    std = np.sqrt(np.maximum(sum(h[2] for h in past) / n - np.square(mean), 0.0)) + self.eps
    self.history.append((x.shape[0], x.sum(0), np.square(x).sum(0)))
    return ((x - mean) / std).astype(np.float32)


def column_permutation(seed: int, n_features: int = 512) -> np.ndarray:
  """The fixed column order of `--permute_columns=SEED`: column j of the output is column perm[j] of the input."""
  return np.random.default_rng([seed, 512]).permutation(n_features)


def write_session_file(
  path: str,
  gen: SyntheticT15,
  session: str,
  day: int,
  n_trials: int,
  labelled: bool,
  rng: np.random.Generator,
  pad_len: int = 500,
  trials_per_block: int = 20,
  columns: np.ndarray | None = None,
) -> None:
  """Writes one `data_<split>.hdf5` of `n_trials` trials in the t15 layout (`columns`: reorder the features)."""
  day_params = gen.day_transform(day, np.random.default_rng([day, 7]))
  zscore = RunningZScore()
  with h5py.File(path, "w") as f:
    for i in range(n_trials):
      x, ids, sentence = gen.trial(rng, day_params)
      x = zscore(x)
      if columns is not None:
        x = x[:, columns]
      g = f.create_group(TRIAL_FMT.format(i))
      g.create_dataset("input_features", data=x)
      g.attrs["n_time_steps"] = x.shape[0]
      g.attrs["session"] = session
      g.attrs["block_num"] = 1 + i // trials_per_block
      g.attrs["trial_num"] = i % trials_per_block
      if labelled:
        seq = np.zeros(pad_len, np.int32)
        seq[: len(ids)] = ids
        text = np.zeros(pad_len, np.int32)
        codes = [ord(ch) for ch in sentence]
        text[: len(codes)] = codes
        g.create_dataset("seq_class_ids", data=seq)
        g.create_dataset("transcription", data=text)
        g.attrs["seq_len"] = len(ids)
        g.attrs["sentence_label"] = sentence


def make_synthetic_dataset(
  out_dir: str,
  sessions,
  *,
  n_sessions: int = 8,
  trials_per_session: int = 60,
  seed: int = 0,
  noise_std: float = 1.0,
  length_profile: str = "demo",
  permute_columns: int | None = None,
  days: Sequence[int] | None = None,
) -> str:
  """Writes `<out_dir>/<session>/data_{train,val,test}.hdf5` for the first `n_sessions` sessions, or with `days`
  for those positions of the session list only (a day's trials and drift depend only on (seed, position), so
  `days=[20]` writes exactly the session that `n_sessions=21` would: a later recording day, for calibration).

  `length_profile` picks trial lengths (LENGTH_PROFILES). Val and test get a quarter of `trials_per_session`
  each; sessions 0, 28, 32, 33 get no val/test file, as in the release. `permute_columns=S` writes the same
  trials with their 512 columns in the fixed order `column_permutation(S)` (a check that a recipe does not
  rely on column order). Returns `out_dir`.
  """
  if not 1 <= n_sessions <= len(sessions):
    raise ValueError(f"n_sessions={n_sessions} must lie in 1..{len(sessions)}")
  days = list(range(n_sessions)) if days is None else [int(d) for d in days]
  if not days or not all(0 <= d < len(sessions) for d in days):
    raise ValueError(f"days={days}: each must lie in 0..{len(sessions) - 1} (positions in the session list)")
  gen = SyntheticT15(seed, n_days_total=len(sessions), noise_std=noise_std, length_profile=length_profile)
  columns = None if permute_columns is None else column_permutation(permute_columns, gen.n_features)
  n_eval = max(1, trials_per_session // 4)
  for day in days:
    session = sessions[day]
    folder = os.path.join(out_dir, session)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([seed, day])
    write_session_file(
      os.path.join(folder, "data_train.hdf5"), gen, session, day, trials_per_session, True, rng, columns=columns
    )
    if day not in N_SILENT_SESSIONS:
      write_session_file(os.path.join(folder, "data_val.hdf5"), gen, session, day, n_eval, True, rng, columns=columns)
      write_session_file(os.path.join(folder, "data_test.hdf5"), gen, session, day, n_eval, False, rng, columns=columns)
  return out_dir
