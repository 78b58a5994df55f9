# The two commands: `make run` and `make test`. Both work on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a GPU machine brings its own.
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test setup setup-test model testdata lint clean

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

# llama.cpp's vocab-only GGUFs and tokenizer vectors, from the llama-cpp-python sdist.
testdata: setup
	$(VENV)/bin/worker-orcd pull --testdata

# `make run`: one chat turn, one code completion (continued greedily up to the first blank line)
# and one question; after each, the load time and the prefill and decode speeds.
define CODE_PROMPT
def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""

endef
define NEWLINE


endef
export CODE_PROMPT NEWLINE
GENERATE = $(VENV)/bin/worker-orcd --log-level warning generate \
	--model "$$($(VENV)/bin/worker-orcd pull --print-path)" --temperature 0

run: model
	$(VENV)/bin/worker-orcd inspect "$$($(VENV)/bin/worker-orcd pull --print-path)"
	@printf '\n$$ worker-orcd generate --chat --prompt "Hello, world!"\n'
	@$(GENERATE) --chat --prompt "Hello, world!" --max-tokens 64
	@printf '\n$$ worker-orcd generate --prompt "$$CODE_PROMPT" --stop "\\n\\n"\n%s' "$$CODE_PROMPT"
	@$(GENERATE) --prompt "$$CODE_PROMPT" --stop "$$NEWLINE$$NEWLINE" --max-tokens 160
	@printf '\n$$ worker-orcd generate --chat --prompt "What is the capital of France? ..."\n'
	@$(GENERATE) --chat --prompt "What is the capital of France? Answer in one sentence." \
		--max-tokens 64

test: setup-test model testdata
	$(VENV)/bin/ruff check worker_orcd tests benchmarks
	$(VENV)/bin/ruff format --check worker_orcd tests benchmarks
	$(PY) -m pytest -q

lint: setup-test
	$(VENV)/bin/ruff check worker_orcd tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
