# Two entry points (README): `make demo` and `make test`. Everything else is their plumbing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test check lint typecheck unit kafka-fetch bench clean

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "quotaflow needs Python >= 3.11, found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,semantic]'
	@touch $(STAMP)

kafka-fetch: $(STAMP)
	$(BIN)/quotaflow kafka fetch

demo: $(STAMP) kafka-fetch
	$(BIN)/quotaflow demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) kafka-fetch lint typecheck
	$(BIN)/pytest -ra

# litellm (the peer quota_util compares against) goes in with --no-deps: its 1.108/1.109
# releases declare certifi>=2026.10.19, which is not published; the `bench` extra holds
# its other requirements.
LITELLM := litellm==1.109.1

bench: $(STAMP) kafka-fetch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/pip install --quiet --no-deps '$(LITELLM)'
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .quotaflow .pytest_cache .mypy_cache .ruff_cache
