# The two commands: `make run` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a GPU machine brings its own.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test setup setup-test model lint clean

# The CPU quantized-matmul extension is built by `pip install -e .` (setup.py): rebuild when it changes.
CPU_EXT := setup.py $(wildcard worker_orcd/kernels/cpu/csrc/*.c worker_orcd/kernels/cpu/csrc/*.h)

$(VENV)/.installed: pyproject.toml $(CPU_EXT)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

setup-test: $(VENV)/.installed-test

model: setup
	$(VENV)/bin/worker-orcd pull

run: model
	$(VENV)/bin/worker-orcd inspect "$$($(VENV)/bin/worker-orcd pull --print-path)"
	$(VENV)/bin/worker-orcd generate --model "$$($(VENV)/bin/worker-orcd pull --print-path)" \
		--prompt "Hello, world!" --max-tokens 32 --temperature 0
	$(VENV)/bin/worker-orcd generate --model "$$($(VENV)/bin/worker-orcd pull --print-path)" \
		--chat --prompt "What is the capital of France? Answer in one sentence." \
		--max-tokens 64 --temperature 0

test: setup-test model
	$(VENV)/bin/ruff check worker_orcd tests benchmarks
	$(VENV)/bin/ruff format --check worker_orcd tests benchmarks
	$(PY) -m pytest -q

lint: setup-test
	$(VENV)/bin/ruff check worker_orcd tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
