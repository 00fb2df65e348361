"""Writes a synthetic dataset in the exact t15 HDF5 layout (SPEC §1), named after the real sessions.

python tools/make_synthetic_data.py --out=DIR [--seed=N] [--sessions=N] [--trials_per_session=N]
  [--length_profile=demo|t15] [--permute_columns=SEED] [--days=20,21]

--days=POS,... writes only those positions of the t15 session list (instead of the first --sessions): with the
same --seed, a later recording day of the same synthetic participant, which a model trained on the first
sessions has never seen (its drift grows with the position). Used for `--config.mode=calibrate`.

--permute_columns=SEED writes the same trials with their 512 feature columns shuffled by one fixed
permutation (b2t_jax.data.synthetic.column_permutation): a recipe that learns both trees does not rely on
column order, which real arrays do not give.
"""

from absl import app, flags

from b2t_jax.data.synthetic import LENGTH_PROFILES, make_synthetic_dataset
from b2t_jax.data.t15 import T15_SESSIONS

_OUT = flags.DEFINE_string("out", None, "output root (an hdf5_data_final-style tree)", required=True)
_SEED = flags.DEFINE_integer("seed", 0, "generator seed")
_SESSIONS = flags.DEFINE_integer("sessions", 8, "number of sessions (the first N of the t15 list)")
_TRIALS = flags.DEFINE_integer("trials_per_session", 80, "train trials per session (val/test get a quarter)")
_NOISE = flags.DEFINE_float("noise_std", 1.0, "per-bin Gaussian noise std")
_PROFILE = flags.DEFINE_enum(
  "length_profile", "demo", sorted(LENGTH_PROFILES), "trial lengths: demo (1.5-4 s) or t15 (like the release, ~2-30 s)"
)
_DAYS = flags.DEFINE_list(
  "days", None, "write only these positions of the session list (a held-out later day); unset = the first --sessions"
)
_PERMUTE = flags.DEFINE_integer(
  "permute_columns",
  None,
  "shuffle the feature columns by the fixed permutation of this seed (same trials otherwise); unset = t15 column order",
)


def main(argv):
  del argv
  out = make_synthetic_dataset(
    _OUT.value,
    T15_SESSIONS,
    n_sessions=_SESSIONS.value,
    trials_per_session=_TRIALS.value,
    seed=_SEED.value,
    noise_std=_NOISE.value,
    length_profile=_PROFILE.value,
    permute_columns=_PERMUTE.value,
    days=None if _DAYS.value is None else [int(d) for d in _DAYS.value],
  )
  written = _SESSIONS.value if _DAYS.value is None else len(_DAYS.value)
  print(f"wrote {written} sessions to {out}")


if __name__ == "__main__":
  app.run(main)
