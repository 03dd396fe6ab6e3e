# `make run` serves the embedded model; `make test` runs every test. Both install what they need,
# exactly as locked: requirements.txt (runtime) and requirements-dev.txt (runtime, dev, bench),
# with hashes. `make lock` refreshes both from pyproject.toml's ranges.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= clawbot.json
PIP := $(BIN)/python -m pip --disable-pip-version-check
# An install is redone when its lock, pyproject.toml or the llama.cpp recipe changes.
stamp = $(VENV)/.installed-$(1)-$(shell cat $(2) pyproject.toml deploy/llama_wheel.py | cksum | cut -d' ' -f1)
RUN_STAMP := $(call stamp,run,requirements.txt)
DEV_STAMP := $(call stamp,dev,requirements-dev.txt)

.PHONY: run test lint lock llama bench bench-inference bench-llama clean chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# llama-cpp-python first, from the portable wheel deploy/llama_wheel.py builds once and caches:
# pip then finds the locked version installed and leaves it.
# -qq: errors only (every package is pinned and hash-checked; pip's notices are noise here).
define install
	$(BIN)/python deploy/llama_wheel.py --lock $(1) --install $(BIN)/python >/dev/null
	$(PIP) install -qq --require-hashes --no-deps -r $(1)
	$(PIP) install -qq --no-deps -e .
endef

$(RUN_STAMP): $(BIN)/python requirements.txt pyproject.toml deploy/llama_wheel.py
	$(call install,requirements.txt)
	rm -f $(VENV)/.installed-run-*
	touch $@

$(DEV_STAMP): $(BIN)/python requirements-dev.txt pyproject.toml deploy/llama_wheel.py
	$(call install,requirements-dev.txt)
	rm -f $(VENV)/.installed-*
	touch $@

run: $(RUN_STAMP)
	$(BIN)/clawbot serve --config $(CONFIG)

# Rebuild (or take from the cache) and reinstall the portable llama-cpp-python.
llama: $(BIN)/python
	$(BIN)/python deploy/llama_wheel.py --lock requirements.txt --install $(BIN)/python

test: $(DEV_STAMP) chromium
	$(BIN)/ruff check app backends policies tests compat_tests bench deploy
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

# Newest versions within pyproject.toml's ranges (LOCK_UPGRADE="--upgrade-package NAME" for one);
# the dev set is resolved first and the runtime set is held to its versions, so both install
# the same packages where they overlap.
LOCK_UPGRADE ?= --upgrade
lock: $(DEV_STAMP)
	$(BIN)/uv pip compile pyproject.toml --extra dev --extra bench --universal \
		--python-version 3.11 --generate-hashes --custom-compile-command 'make lock' \
		$(LOCK_UPGRADE) --quiet -o requirements-dev.txt
	$(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
		--custom-compile-command 'make lock' -c requirements-dev.txt --quiet -o requirements.txt

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

bench: $(DEV_STAMP)
	$(BIN)/python bench/gateway_overhead.py

# The embedded model through clawbot vs. llama-cpp-python's server, e.g.
#   make bench-inference BENCH_ARGS=--quick
bench-inference: $(DEV_STAMP)
	$(BIN)/python bench/inference.py $(BENCH_ARGS)

# llama_decode speed of the portable build against native ones (compiles each once, cached).
bench-llama: $(DEV_STAMP)
	$(BIN)/python bench/llama_builds.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
