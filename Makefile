# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap on first use:
# the Debian package dataset-fashion-mnist (when root with apt-get), a .venv, and
# `pip install -e '.[dev]'` (torch pinned to the 2.13.0 CPU wheel). Later runs reuse the venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist
OUT    ?= runs/demo
# `make results`: the studies behind the README's numbers, each run from scratch into
# docs/results/<study>/ (--fresh refuses a non-empty directory, so no task cached by older code
# is reused), with its report; then the README's figures (docs/figures/, figures.json).
# One study: make results STUDIES=studies/fmnist_fc35.toml
STUDIES ?= studies/fmnist_decisive.toml studies/fmnist_vgg3.toml studies/fmnist_recipes.toml
RESULT_DIRS = $(addprefix docs/results/,$(basename $(notdir $(STUDIES))))

.PHONY: help setup data demo test test-slow lint bench clean results stutz notebooks

help:
	@echo "make demo       train normal + bit-flip-trained BNNs, sweep, metrics (Fashion-MNIST)"
	@echo "make test       lint + default test suite (< 10 min on 2 cores)"
	@echo "make test-slow  the slow tests too"
	@echo "make bench      benchmarks -> benchmarks/RESULTS.md"
	@echo "make results    every published number: STUDIES (default decisive fc, vgg3, recipes)"
	@echo "                each fresh into docs/results/<study>/ (report, environment.json), figures -> docs/figures/"
	@echo "make stutz      m-bit networks vs BNNs (Stutz et al.) -> docs/results/stutz_*/"
	@echo "make notebooks  run notebooks/*.ipynb in place and store them with their outputs"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP) data

data:
	@if [ ! -f $(FMNIST)/t10k-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing dataset-fashion-mnist with apt-get"; \
	  apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } || \
	  echo "warning: could not install dataset-fashion-mnist; tests that need it are skipped"; \
	fi

demo: setup
	$(BIN)/bnn-tol demo --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check bnn_tol tests benchmarks scripts notebooks
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

results: setup
	@for s in $(STUDIES); do \
	  $(BIN)/bnn-tol study $$s --out docs/results/$$(basename $$s .toml) --fresh || exit 1; \
	done
	$(BIN)/python scripts/readme_figures.py --out docs/figures $(RESULT_DIRS)
	@echo "results in $(RESULT_DIRS): report.html, summary.md, environment.json (versions, commit, CPU, threads); figures in docs/figures"

stutz: setup
	$(BIN)/python scripts/stutz_fmnist.py --out docs/results/stutz_fmnist
	$(BIN)/python scripts/stutz_fmnist.py --out docs/results/stutz_ladder --ladder 8,4,3,2 \
	  --ladder-only --epochs 5 --maps 20 --bers 0,0.005,0.01,0.02 --threads 1
	$(BIN)/python scripts/stutz_fmnist.py --out docs/results/stutz_sweeps --sweeps-only \
	  --epochs 5 --maps 10 --bers 0,0.005,0.01,0.02,0.05 --threads 1
	$(BIN)/python scripts/stutz_fmnist.py --out docs/results/stutz_vgg3 --conv \
	  --epochs 2 --maps 5 --bers 0,0.005,0.01,0.02,0.05
	$(BIN)/python scripts/attack_equal_memory.py --out docs/results/stutz_attack --threads 1
	$(BIN)/python scripts/stutz_energy.py --out docs/results/stutz_fmnist

bench: setup
	$(BIN)/python -m benchmarks.run

# The notebooks are committed with their outputs (figures on the repository page); the tests
# run a copy on small settings and fail for a notebook committed without outputs.
notebooks: setup
	$(BIN)/python scripts/run_notebooks.py

clean:
	rm -rf $(VENV) runs .pytest_cache
