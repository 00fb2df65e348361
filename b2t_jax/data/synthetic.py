"""A learnable synthetic stand-in for the t15 release, written in exactly its HDF5 layout (SPEC §1).

Sentences come from a small built-in lexicon and a sparse word grammar (each word has a few possible
successors, drawn once from the seed), so a word n-gram LM trained on the train sentences knows something
the acoustics do not, as a real corpus LM does. Each phoneme class has a tuning pattern spanning several
20 ms bins over 16 spatially smooth "neural modes" (32 adjacent electrodes share a mode, with their own
gain), so the structure survives both the full 512-feature model and feature pooling. Each day applies a
per-channel gain and offset that drift linearly over days, plus day-specific jitter; Gaussian noise on top.
"""

from __future__ import annotations

import os

import h5py
import numpy as np

from b2t_jax.data.t15 import PHONEMES, SIL_ID, TRIAL_FMT

# word -> ARPAbet without stress; together they cover all 39 phonemes.
LEXICON = {
    "i": "AY", "you": "Y UW", "we": "W IY", "they": "DH EY", "he": "HH IY", "she": "SH IY", "the": "DH AH",
    "a": "AH", "is": "IH Z", "to": "T UW", "and": "AE N D", "of": "AH V", "in": "IH N", "that": "DH AE T",
    "have": "HH AE V", "for": "F AO R", "not": "N AA T", "with": "W IH DH", "do": "D UW", "say": "S EY",
    "good": "G UH D", "know": "N OW", "want": "W AA N T", "think": "TH IH NG K", "water": "W AO T ER",
    "please": "P L IY Z", "thank": "TH AE NG K", "yes": "Y EH S", "help": "HH EH L P", "my": "M AY",
    "family": "F AE M AH L IY", "today": "T AH D EY", "time": "T AY M", "home": "HH OW M", "very": "V EH R IY",
    "much": "M AH CH", "go": "G OW", "come": "K AH M", "see": "S IY", "like": "L AY K", "need": "N IY D",
    "feel": "F IY L", "tired": "T AY ER D", "happy": "HH AE P IY", "juice": "JH UW S",
    "pleasure": "P L EH ZH ER", "boy": "B OY", "how": "HH AW", "out": "AW T", "thing": "TH IH NG",
    "red": "R EH D", "book": "B UH K", "car": "K AA R", "watch": "W AA CH", "put": "P UH T",
    "school": "S K UW L", "brother": "B R AH DH ER", "bird": "B ER D", "voice": "V OY S", "zoo": "Z UW",
    "shoe": "SH UW", "eat": "IY T", "now": "N AW", "what": "W AH T", "right": "R AY T", "talk": "T AO K",
    "morning": "M AO R N IH NG", "outside": "AW T S AY D", "music": "M Y UW Z IH K", "doctor": "D AA K T ER",
    "call": "K AO L", "nurse": "N ER S", "bed": "B EH D", "cold": "K OW L D", "warm": "W AO R M",
}
_PHONEME_ID = {p: i for i, p in enumerate(PHONEMES)}
# Trial-length profiles: [low, high) ranges of words per sentence and of 20 ms bins per phoneme, per word
# boundary and before/after speech. 'demo' keeps trials short (1.5-4 s) so the demo trains in minutes; 't15'
# mimics the release's spread (about 2-30 s, ~2 s per attempted word) for bucketing measurements.
LENGTH_PROFILES = {
    "demo": {"words": (3, 8), "phoneme_bins": (3, 7), "boundary_bins": (2, 4), "edge_bins": (8, 20)},
    "t15": {"words": (2, 13), "phoneme_bins": (10, 30), "boundary_bins": (10, 40), "edge_bins": (25, 75)},
}
N_SILENT_SESSIONS = (0, 28, 32, 33)   # t15 sessions without val/test files (SPEC §1)


def sentence_to_ids(words: list[str]) -> list[int]:
  """Phoneme ids of a sentence with the word-boundary token after every word."""
  ids = []
  for w in words:
    ids += [_PHONEME_ID[p] for p in LEXICON[w].split()] + [SIL_ID]
  return ids


class SyntheticT15:
  """Deterministic generator: neural tuning and day drift are fixed by the seed; trials drawn from it."""

  n_modes = 16            # smooth latent modes; 32 adjacent channels share one
  pattern_bins = 6        # a phoneme's tuning pattern spans this many 20 ms bins
  successors = 4          # words that may follow a given word (the grammar's branching factor)
  grammar_stream = 99     # PRNG stream of the grammar, apart from the neural tuning's

  def __init__(self, seed: int = 0, n_features: int = 512, n_days_total: int = 45, noise_std: float = 1.0,
               length_profile: str = "demo"):
    if length_profile not in LENGTH_PROFILES:
      raise ValueError(f"length_profile={length_profile!r}: expected one of {sorted(LENGTH_PROFILES)} "
                       "(config.data.synthetic.length_profile)")
    self.lengths = LENGTH_PROFILES[length_profile]
    self.rng = np.random.default_rng(seed)
    self.n_features, self.n_days_total, self.noise_std = n_features, n_days_total, noise_std
    rng = self.rng
    taper = np.hanning(self.pattern_bins + 2)[1:-1, None]
    self.patterns = 1.2 * rng.standard_normal((len(PHONEMES), self.pattern_bins, self.n_modes)) * taper
    self.channel_mode = np.arange(n_features) * self.n_modes // n_features
    self.channel_gain = rng.uniform(0.6, 1.4, n_features)
    self.drift_gain = rng.uniform(-0.4, 0.4, n_features)
    self.drift_offset = rng.uniform(-0.8, 0.8, n_features)
    self.words = sorted(LEXICON)
    grammar = np.random.default_rng([seed, self.grammar_stream])
    self.next_words = [grammar.choice(len(self.words), self.successors, replace=False)
                       for _ in self.words]
    self.next_probs = [grammar.dirichlet(np.ones(self.successors)) for _ in self.words]

  def sentence(self, rng: np.random.Generator, n_words: int) -> list[str]:
    """A first word uniformly from the lexicon, then each next word from its predecessor's successors."""
    w = int(rng.integers(len(self.words)))
    out = [w]
    for _ in range(n_words - 1):
      w = int(rng.choice(self.next_words[w], p=self.next_probs[w]))
      out.append(w)
    return [self.words[i] for i in out]

  def day_transform(self, day: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    frac = day / max(self.n_days_total - 1, 1)
    gain = 1.0 + self.drift_gain * frac + 0.05 * rng.standard_normal(self.n_features)
    offset = self.drift_offset * frac + 0.2 * rng.standard_normal(self.n_features)
    return gain, offset

  def layout(self, rng: np.random.Generator) -> tuple[list[str], list[int], list[int], int, int]:
    """A sentence and its timing: (words, phoneme ids, bins per phoneme, lead bins, total bins)."""
    p = self.lengths
    words = self.sentence(rng, int(rng.integers(*p["words"])))
    ids = sentence_to_ids(words)
    durations = [int(rng.integers(*p["boundary_bins"])) if i == SIL_ID else int(rng.integers(*p["phoneme_bins"]))
                 for i in ids]
    lead, tail = int(rng.integers(*p["edge_bins"])), int(rng.integers(*p["edge_bins"]))
    return words, ids, durations, lead, lead + sum(durations) + tail + self.pattern_bins

  def trial(self, rng: np.random.Generator, gain: np.ndarray, offset: np.ndarray):
    words, ids, durations, lead, t = self.layout(rng)
    modes = np.zeros((t, self.n_modes))
    onset = lead
    for i, d in zip(ids, durations):
      modes[onset:onset + self.pattern_bins] += self.patterns[i]
      onset += d
    x = modes[:, self.channel_mode] * self.channel_gain
    x = x * gain + offset + self.noise_std * rng.standard_normal((t, self.n_features))
    return x.astype(np.float32), ids, " ".join(words)


def write_session_file(path: str, gen: SyntheticT15, session: str, day: int, n_trials: int, labelled: bool,
                       rng: np.random.Generator, pad_len: int = 500, trials_per_block: int = 20) -> None:
  """Writes one `data_<split>.hdf5` of `n_trials` trials in the t15 layout."""
  gain, offset = gen.day_transform(day, np.random.default_rng([day, 7]))
  with h5py.File(path, "w") as f:
    for i in range(n_trials):
      x, ids, sentence = gen.trial(rng, gain, offset)
      g = f.create_group(TRIAL_FMT.format(i))
      g.create_dataset("input_features", data=x)
      g.attrs["n_time_steps"] = x.shape[0]
      g.attrs["session"] = session
      g.attrs["block_num"] = 1 + i // trials_per_block
      g.attrs["trial_num"] = i % trials_per_block
      if labelled:
        seq = np.zeros(pad_len, np.int32)
        seq[:len(ids)] = ids
        text = np.zeros(pad_len, np.int32)
        codes = [ord(ch) for ch in sentence]
        text[:len(codes)] = codes
        g.create_dataset("seq_class_ids", data=seq)
        g.create_dataset("transcription", data=text)
        g.attrs["seq_len"] = len(ids)
        g.attrs["sentence_label"] = sentence


def make_synthetic_dataset(out_dir: str, sessions, *, n_sessions: int = 8, trials_per_session: int = 60,
                           seed: int = 0, noise_std: float = 1.0, length_profile: str = "demo") -> str:
  """Writes `<out_dir>/<session>/data_{train,val,test}.hdf5` for the first `n_sessions` sessions.

  `length_profile` picks trial lengths (LENGTH_PROFILES). Val and test get a quarter of `trials_per_session` each; sessions 0, 28, 32, 33 get no val/test file,
  as in the release. Returns `out_dir`.
  """
  if not 1 <= n_sessions <= len(sessions):
    raise ValueError(f"n_sessions={n_sessions} must lie in 1..{len(sessions)}")
  gen = SyntheticT15(seed, n_days_total=len(sessions), noise_std=noise_std, length_profile=length_profile)
  n_eval = max(1, trials_per_session // 4)
  for day, session in enumerate(sessions[:n_sessions]):
    folder = os.path.join(out_dir, session)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([seed, day])
    write_session_file(os.path.join(folder, "data_train.hdf5"), gen, session, day, trials_per_session, True, rng)
    if day not in N_SILENT_SESSIONS:
      write_session_file(os.path.join(folder, "data_val.hdf5"), gen, session, day, n_eval, True, rng)
      write_session_file(os.path.join(folder, "data_test.hdf5"), gen, session, day, n_eval, False, rng)
  return out_dir
