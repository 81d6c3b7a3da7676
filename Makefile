# One command per job on a fresh machine:
#   make serve   set up .venv, build the default model if needed, serve it over HTTP
#   make test    set up .venv and run the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel on a CPU-only machine; on a GPU machine pass e.g. TORCH="torch==2.13.0"
# from your CUDA index. Installed before the project so pip never resolves torch itself.
TORCH  ?= torch==2.13.0

.PHONY: setup system-packages serve test test-quick bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,bench]"
	touch $@

serve: setup
	$(BIN)/tensorfleet serve

# Prometheus, sshd and rsync are real peers in the tests (apt-get, only what is missing)
system-packages:
	bash .ci/system-packages

test: setup system-packages
	$(BIN)/python -m pytest -q -ra tests

test-quick: setup
	$(BIN)/python -m pytest -q -ra -m "not slow" tests

# The side-by-side benchmark, 3 interleaved rounds (~28 min on a quiet 2-core CPU): table, JSON and chart in bench_results/
bench: setup
	$(BIN)/python -m deploy.bench.compare --repeats 3 --out bench_results

clean:
	rm -rf $(VENV) build *.egg-info
