# Every target works as the first command on a fresh machine: the venv is built on demand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DIR ?= /tmp/b2t_demo
# Default test parallelism: the suite is CPU bound and this machine has 2 cores. Tests marked
# xdist_group(NAME) share a module-scoped fixture and run in one worker (--dist loadgroup).
PYTEST_ARGS ?= -n 2 --dist loadgroup
# The demo and the tests run on the CPU. With libtpu installed (the tpu extra) JAX would otherwise probe for a TPU
# at start-up and log errors where there is none; `make demo JAX_PLATFORMS=` lets JAX pick an accelerator.
JAX_PLATFORMS ?= cpu
export JAX_PLATFORMS

.PHONY: setup demo test lint format bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info
