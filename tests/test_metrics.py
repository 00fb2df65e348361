"""Greedy CTC decoding, edit distance and error rates on hand-worked cases (SPEC §5)."""

import pytest

from b2t_jax import metrics
from b2t_jax.vocab import BLANK_ID

_ = BLANK_ID


@pytest.mark.parametrize(
  "frames,length,want",
  [
    ([_, 3, 3, _, 3, 5, 5, _], 8, [3, 3, 5]),  # repeats collapse; a blank between equal ids keeps both
    ([3, 3, 3, 3], 4, [3]),
    ([_, 3, 3, _, 3, 5, 5, _], 3, [3]),  # only the first `length` frames count
    ([_, 3, 3, _, 3, 5, 5, _], 0, []),
    ([_, _, _], 3, []),
    ([7, 2, 7, 7, 2], 5, [7, 2, 7, 2]),  # no blank needed between different ids
    ([4, _, _, 4, 4, _, 9], 7, [4, 4, 9]),
  ],
)
def test_greedy_decode_collapses_repeats_then_drops_blanks(frames, length, want):
  assert metrics.greedy_decode(frames, length) == want


@pytest.mark.parametrize(
  "a,b,want",
  [
    ("kitten", "sitting", 3),  # two substitutions and an insertion
    ("", "abc", 3),
    ("abc", "", 3),
    ("abc", "abc", 0),
    ("ab", "ba", 2),  # no transposition in Levenshtein
    ("abcdef", "azced", 3),
    ([1, 2, 3, 4], [2, 3, 4], 1),  # one deletion at the front
    ([1, 2, 3], [1, 9, 2, 3], 1),
  ],
)
def test_edit_distance_hand_cases(a, b, want):
  assert metrics.edit_distance(a, b) == want
  assert metrics.edit_distance(b, a) == want


def test_error_rate_is_total_errors_over_total_reference_length_per_day():
  er = metrics.ErrorRate()
  er.add(2, [1, 2, 3], [1, 2, 3, 4])  # 1 error / 4
  er.add(2, [5], [6, 7])  # 2 errors / 2
  er.add(0, [], [8, 9, 10, 11, 12, 13])  # 6 errors / 6
  assert er.rate() == pytest.approx(9 / 12)  # pooled, not the mean of per-trial rates
  assert er.per_day() == {0: pytest.approx(1.0), 2: pytest.approx(3 / 6)}
