# curvlens developer commands. `make demo` and `make test` each set up .venv by themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints/ci.txt
OUT ?= curvlens-out

.PHONY: demo test test-slow test-all bench lint docs package-check hooks clean venv

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

# The documentation (docs/), warnings as errors; HTML in docs/_build/html.
docs: $(VENV)/.stamp-docs
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html
	@echo "docs: docs/_build/html/index.html"

# Build the wheel and sdist, install the wheel into a fresh venv (dependencies from the package
# index, as a user would get them) and run the demo there, outside the source tree; then check
# that the sdist installs too.
PKG_VENV := .package-check
package-check: $(VENV)/.stamp-package
	rm -rf dist build $(PKG_VENV)
	$(PY) -m build --outdir dist .
	$(PYTHON) -m venv $(PKG_VENV)
	$(PKG_VENV)/bin/python -m pip install -q -c $(CONSTRAINTS) "$$(ls dist/*.whl)[examples]"
	cd $(PKG_VENV) && bin/curvlens demo --epochs 1 --no-progress --out demo-out > demo.log
	test -s $(PKG_VENV)/demo-out/report.json && test -s $(PKG_VENV)/demo-out/plots/alpha_fits.png
	$(PKG_VENV)/bin/python -c "import importlib.resources as r; assert r.files('curvlens').joinpath('py.typed').is_file()"
	$(PKG_VENV)/bin/python -m pip install -q --no-deps --force-reinstall dist/*.tar.gz
	cd $(PKG_VENV) && bin/python -c "import curvlens; print('package-check: curvlens', curvlens.__version__, 'from', curvlens.__file__)"
	rm -rf $(PKG_VENV)  # several GB (torch); kept only when a step above failed

hooks:
	git config core.hooksPath hooks
	@echo "git hooks installed from hooks/"

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache .ruff_cache *.egg-info docs/_build dist build .package-check
