# sail-jax: `make demo` and `make test` work on a fresh clone (they create .venv first).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)
export XLA_PYTHON_CLIENT_PREALLOCATE := false
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test demo bench lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

venv: $(STAMP)

# Two workers: compilation is single-threaded, so two processes keep both cores busy (tests are independent).
test: venv
	$(PY) -m pytest -n 2 --dist loadfile tests

demo: venv
	$(VENV)/bin/sail-jax demo --out demo_out

bench: venv
	@for b in benchmarks/[!_]*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: venv
	$(VENV)/bin/ruff check sail_jax converters pallas_kernels tests benchmarks setup.py

clean:
	rm -rf $(VENV) .pytest_cache
