# Every target works as the first command on a fresh machine: the venv is built on demand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= /tmp/b2t_demo
# Default test parallelism: the suite is CPU bound and this machine has 2 cores. Tests marked
# xdist_group(NAME) share a module-scoped fixture and run in one worker (--dist loadgroup). A worker that dies (a
# test past pytest-timeout's limit ends its process) ends the run: under --dist loadgroup pytest-xdist 3.8 waits
# forever for the worker it starts in its place (seen: a CI run held to its deadline).
PYTEST_ARGS ?= -n 2 --dist loadgroup --max-worker-restart=0
# The demo and the tests run on the CPU. With libtpu installed (the tpu extra) JAX would otherwise probe for a TPU
# at start-up and log errors where there is none; `make demo JAX_PLATFORMS=` lets JAX pick an accelerator.
JAX_PLATFORMS ?= cpu
export JAX_PLATFORMS

.PHONY: setup demo test lint format bench figures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lm,tpu]'
	touch $(STAMP)

setup: $(STAMP)

# Trains the demo triple model (all 512 features) end to end on freshly generated synthetic t15 data, read through the same
# TFDS (ArrayRecord) path as the real release.
demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) tools/make_synthetic_data.py --out=$(DEMO_DIR)/hdf5 --sessions=8 --trials_per_session=80 --seed=0
	$(PY) tools/prepare_data.py --hdf5_dir=$(DEMO_DIR)/hdf5 --data_dir=$(DEMO_DIR)/tfds --config=configs/demo.py
	$(PY) -m b2t_jax.main --config=configs/demo.py --workdir=$(DEMO_DIR)/work --config.data.data_dir=$(DEMO_DIR)/tfds

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests

# Style and static checks (ruff, configured in pyproject.toml); `make format` rewrites files to the style.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# b2t_jax vs the PyTorch reference step on the same shapes (alternating runs), then the triple model.
bench: $(STAMP)
	$(PY) tools/bench_compare.py $(BENCH_ARGS)

# Re-takes the README's CPU tables (tools/figures.py) and pastes each between its README markers. It takes HOURS
# on 2 CPU cores (training runs, make bench, the full-size memory compiles, the encoder comparison, ~4 h alone):
# run it on a quiet machine. `FIGURES=bench,levers make figures` re-takes a subset; `python tools/figures.py --list`
# names the jobs. Data, runs and logs go to FIGURES_DIR, emptied first.
FIGURES ?=
FIGURES_DIR ?= /tmp/b2t_figures
figures: $(STAMP)
	rm -rf $(FIGURES_DIR)
	$(PY) tools/figures.py --workdir=$(FIGURES_DIR) --readme $(if $(FIGURES),--only=$(FIGURES))

clean:
	rm -rf $(VENV) build *.egg-info
