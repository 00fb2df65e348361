"""tools/figures.py: its jobs and the README's markers agree, --readme rewrites only the marked regions, and each
job's parser turns a recorded run of its commands into the expected table (so a tool whose output format changes
fails here, not at the end of a multi-hour `make figures`).

The recorded runs (tests/data/figures/NAME.json) are `python tools/figures.py --quick` runs of the real commands
at tiny sizes: the same tools and output formats as the full runs, other numbers. NAME.md is the table each must
give, checked by hand against the recorded output.
"""

import json
import os
import shutil
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "tools"))
import figures  # noqa: E402

SAMPLES = os.path.join(ROOT, "tests", "data", "figures")


def _readme() -> str:
  with open(figures.README, encoding="utf-8") as f:
    return f.read()


def _sample(name: str) -> dict:
  with open(os.path.join(SAMPLES, f"{name}.json"), encoding="utf-8") as f:
    return json.load(f)


def test_every_job_has_one_readme_marker_pair_and_every_marker_a_job():
  text = _readme()
  assert sorted(figures.markers(text)) == sorted(figures.JOBS)
  for name in figures.JOBS:
    start, end = f"<!-- figures:{name} -->", f"<!-- /figures:{name} -->"
    assert text.count(start) == 1 and text.count(end) == 1, name
    assert text.index(start) < text.index(end), name
  # No stray closing marker without its job either.
  assert sorted(figures.re.findall(r"<!-- /figures:([a-z0-9_]+) -->", text)) == sorted(figures.JOBS)


def test_replace_region_changes_only_what_lies_between_the_markers():
  text = _readme()
  start, end = "<!-- figures:bench -->", "<!-- /figures:bench -->"
  out = figures.replace_region(text, "bench", "\nHEADER\n\n| a |\n|---|\n| 1 |\n")
  i, j = text.index(start) + len(start), text.index(end)
  assert out[:i] == text[:i]
  assert out[out.index(end) :] == text[j:]
  assert out[i : out.index(end)] == "\nHEADER\n\n| a |\n|---|\n| 1 |\n"
  # Idempotent: pasting the same body again changes nothing.
  assert figures.replace_region(out, "bench", "HEADER\n\n| a |\n|---|\n| 1 |") == out


def test_replace_region_keeps_a_list_items_indentation_and_names_missing_markers():
  text = "- a note:\n\n  <!-- figures:x -->\n  old\n  <!-- /figures:x -->\n\n  more\n"
  out = figures.replace_region(text, "x", "T\n\n| 1 |")
  assert out == "- a note:\n\n  <!-- figures:x -->\n  T\n\n  | 1 |\n  <!-- /figures:x -->\n\n  more\n"
  with pytest.raises(ValueError, match=r"exactly one <!-- figures:y -->"):
    figures.replace_region(text, "y", "T")
  with pytest.raises(ValueError, match="found 2 and 2"):
    figures.replace_region(text + text, "x", "T")


def test_readme_flag_pastes_recorded_tables_into_a_copy_of_the_readme(tmp_path):
  """`--from_records --readme` (the path `make figures` ends on) rewrites the bucketing region of a README copy and
  nothing else; a --quick record is refused there."""
  readme = tmp_path / "README.md"
  shutil.copy(figures.README, readme)
  os.makedirs(tmp_path / "work" / "records")
  saved = _sample("bucketing")
  saved["meta"]["quick"] = False  # a full run's record, as make figures writes it
  with open(tmp_path / "work" / "records" / "bucketing.json", "w", encoding="utf-8") as f:
    json.dump(saved, f)
  args = ["--only=bucketing", f"--workdir={tmp_path / 'work'}", "--from_records", "--readme", f"--readme_path={readme}"]
  assert figures.main(args) == 0
  text, before = readme.read_text(encoding="utf-8"), _readme()
  want = figures.replace_region(before, "bucketing", figures.render("bucketing", saved))
  assert text == want and text != before
  assert "Taken by `python tools/figures.py --only=bucketing`" in text
  saved["meta"]["quick"] = True
  with open(tmp_path / "work" / "records" / "bucketing.json", "w", encoding="utf-8") as f:
    json.dump(saved, f)
  shutil.copy(figures.README, readme)
  assert figures.main(args) == 1
  assert readme.read_text(encoding="utf-8") == before


@pytest.mark.parametrize("name", sorted(figures.JOBS))
def test_each_jobs_parser_gives_the_expected_table_from_its_recorded_output(name):
  saved = _sample(name)
  records = {k: figures.Record(**v) for k, v in saved["records"].items()}
  with open(os.path.join(SAMPLES, f"{name}.md"), encoding="utf-8") as f:
    want = f.read()
  assert figures.JOBS[name].table(records) + "\n" == want


def test_header_names_the_commands_machine_date_and_load():
  saved = _sample("streaming")
  text = figures.render("streaming", saved)
  meta = saved["meta"]
  first = text.splitlines()[0]
  assert first.startswith(f"Taken by `python tools/figures.py --only=streaming` on {meta['date']}: {meta['cpu']}")
  assert (
    f"{meta['cores']} cores; load average {meta['load_before']:.1f} before, {meta['load_after']:.1f} after" in first
  )
  assert "QUICK RUN" in first  # the samples are quick runs, and say so
  assert "```bash\npython tools/benchmark_streaming.py" in text


def test_cpu_model_reads_the_family_from_proc_cpuinfo(tmp_path):
  info = tmp_path / "cpuinfo"
  info.write_text(
    "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: AMD EPYC\n\n"
  )
  assert figures.cpu_model(str(info)) == "AMD EPYC (family 26, model 2)"


def test_levers_compare_each_round_with_that_rounds_default():
  """Rounds drift (here the first is slow for every variant): a variant faster in one round and slower in another
  is no consistent difference, though its median (1000 ms) is below the default's (1100 ms)."""

  def rec(tag: str, ms: float) -> figures.Record:
    line = {"tag": tag, "step_ms_median": ms, "quiet": True, "config": "gru_baseline.py", "global_batch": 8}
    return figures.Record(cmd="", stdout=json.dumps({**line, "time_bins": 500}) + "\n", stderr="", seconds=0.0)

  times = {"default": [1500, 1100, 900], "unroll2": [1450, 1000, 950], "remat": [1800, 1320, 1080]}
  records = {f"lever_{tag}_{rnd}": rec(tag, ms) for tag, each in times.items() for rnd, ms in enumerate(each)}
  rows = {row.split(" | ")[0].lstrip("| "): row.split(" | ") for row in figures.table_levers(records).splitlines()}
  assert rows["`gru_unroll=2`"][1:3] == ["1000 ms (1450 / 1000 / 950)", "no consistent difference (ratios 0.91–1.06)"]
  assert rows["`gru_remat=True`"][2] == "1.20× slower (ratios 1.20–1.20)"
