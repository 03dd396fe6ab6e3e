# `make run` serves the embedded model; `make test` runs every test. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= clawbot.json
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: run test lint bench bench-inference clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/clawbot serve --config $(CONFIG)

test: $(STAMP) chromium
	$(BIN)/ruff check app backends policies tests compat_tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

# The admin UI's browser test drives the system Chromium (Playwright downloads no browser):
# installed when missing; CI must have it, elsewhere the test is skipped without it.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
				apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; \
		elif [ "$$CI" = true ]; then \
			echo "CI=true needs chromium for the admin UI browser test" >&2; exit 1; \
		else \
			echo "chromium is not installed: the admin UI browser test will be skipped"; \
		fi; }

bench: $(STAMP)
	$(BIN)/python bench/gateway_overhead.py

# The embedded model through clawbot vs. llama-cpp-python's server (the `bench` extra), e.g.
#   make bench-inference BENCH_ARGS=--quick
bench-inference: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python bench/inference.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
