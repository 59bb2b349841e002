# geex-jax developer entry points. Every target creates the virtualenv (.venv) when missing.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# Data that lives outside the repository (tokenizer files, HumanEval-X); tests skip what is absent.
GEEX_SHARED ?= $(abspath ../shared)
export GEEX_SHARED

.PHONY: demo test test-fast lint toolchains venv bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $@

venv: $(VENV)/.installed

## The main job on the embedded default: no downloads beyond the package registries.
demo: venv
	$(BIN)/python -m geex_jax.demo

## Every test, with the HumanEval-X toolchains installed first (skipped with a note where it cannot).
test: venv toolchains lint
	$(BIN)/python -m pytest -q -rs tests

## ruff (configured in pyproject.toml): the linter, and the formatter in check mode.
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

## The tests without the slow integration ones and without installing toolchains.
test-fast: venv
	$(BIN)/python -m pytest -q -rs -m "not slow" tests

## g++/Boost/OpenSSL, OpenJDK, Node.js + js-md5, Go + testify, Rust crates (Debian packages + npm).
toolchains:
	bash scripts/install_toolchains.sh

clean:
	rm -rf $(VENV) .pytest_cache
