# gru-lm: `make test` and `make train` each work as the first command on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/gru-scratch.yaml
PREFIX ?= time traveller

.PHONY: install test test-quick test-compat lint typecheck dist train predict recipe bench clean

install: $(STAMP)

# Re-installs only when pyproject.toml or constraints.txt change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

lint: install
	$(PY) -m ruff check .

# The annotations are checked, not only written: mypy over gru_lm/ (pyproject.toml's [tool.mypy]).
typecheck: install
	$(PY) -m mypy

test: install lint typecheck
	$(PY) -m pytest

# The edit-test loop: lint, types and every module's tests except the slow ones (training
# subprocesses, signals, several processes, the notebooks); `make test` runs them all.
test-quick: install lint typecheck
	$(PY) -m pytest -m "not slow"

# The other end of what pyproject.toml declares, as a Colab notebook has it: Python 3.13 and
# torch 2.11, installed with a plain `pip install -e .` (no constraints file: the newest
# releases of everything else), in a venv of its own. torch 2.11 for Python 3.13 comes from
# PyPI as its CUDA build (about 5 GB with its CUDA libraries), which runs on the CPU.
COMPAT_PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) \
	$(shell command -v python3.13 2>/dev/null))
COMPAT_TORCH ?= 2.11.0
COMPAT_VENV := .venv-compat
test-compat:
	@test -n "$(COMPAT_PYTHON)" || { echo "make test-compat needs Python 3.13: install it \
	(pyenv install 3.13) or name it with COMPAT_PYTHON=/path/to/python3.13" >&2; exit 2; }
	test -x $(COMPAT_VENV)/bin/python || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(COMPAT_VENV)/bin/python -m pip install --quiet "torch==$(COMPAT_TORCH)"
	$(COMPAT_VENV)/bin/python -m pip install --quiet -e ".[dev]"
	$(COMPAT_VENV)/bin/python -c "import sys, torch; print('compat:', sys.version.split()[0], \
	'torch', torch.__version__)"
	$(COMPAT_VENV)/bin/python -m pytest -p no:cacheprovider

# The sdist and the wheel (recipes, The Time Machine and the kernels' source inside), built
# with this venv's setuptools: no download.
dist: install
	$(PY) -m build --no-isolation --outdir dist .

train: install
	$(VENV)/bin/gru-lm train --config $(CONFIG)

predict: install
	$(VENV)/bin/gru-lm predict "$(PREFIX)"

# The best held-out figure within 30 minutes of 2 cores (docs/results.md, "The 30-minute
# recipe"): two LSTM and two Mogrifier seeds trained two at a time (one core each), then their
# ensemble with member weights, dynamic evaluation, the cache and the 8-gram mixture, all
# chosen on val.
RECIPE_OUT ?= runs/recipe
recipe: install
	$(VENV)/bin/gru-lm compare configs/lstm.yaml configs/mogrifier.yaml --seeds 2 --jobs 2 \
		--out $(RECIPE_OUT) --resume -q
	$(VENV)/bin/gru-lm evaluate $(foreach r,lstm-s0 lstm-s1 mogrifier-s0 mogrifier-s1,--run $(RECIPE_OUT)/$(r)) \
		--weighted --cache --dynamic --mix-ngram --ngram-order 8

bench: install
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/cli_latency.py
	$(PY) benchmarks/gemm.py
	$(PY) benchmarks/tokenstore.py
	$(PY) benchmarks/ddp.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) dist .pytest_cache .ruff_cache .mypy_cache build *.egg-info gru_lm/__pycache__ tests/__pycache__
