# curvlens developer commands. `make demo` and `make test` each set up .venv by themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints/ci.txt
OUT ?= curvlens-out

.PHONY: demo test test-slow test-all bench lint hooks clean venv

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# One stamp per set of extras, re-made when setup.cfg or the constraints change.
$(VENV)/.stamp-%: setup.cfg $(CONSTRAINTS) | $(VENV)/bin/python
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[$(subst +,$(comma),$*)]"
	touch $@

comma := ,

venv: $(VENV)/.stamp-test+examples

demo: $(VENV)/.stamp-examples
	$(PY) -m curvlens demo --out $(OUT)

test: $(VENV)/.stamp-test+examples
	$(PY) -m pytest -m "not slow" -q tests --doctest-modules curvlens

test-slow: $(VENV)/.stamp-test+examples+reference
	$(PY) -m pytest -m slow -q

test-all: $(VENV)/.stamp-test+examples+reference
	$(PY) -m pytest -q

bench: $(VENV)/.stamp-test+examples+bench
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: $(VENV)/.stamp-lint
	$(PY) -m ruff check curvlens tests benchmarks examples

hooks:
	git config core.hooksPath hooks
	@echo "git hooks installed from hooks/"

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache *.egg-info
