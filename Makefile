# Two set-up-and-go targets: `make demo` and `make test` (`make test-fast` for the edit loop). All create .venv if missing.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-fast bench install clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hspace run

# lint (ruff, configured in pyproject.toml), then every test, on every core up to 4 (pytest-xdist: the slow
# tests' subprocesses run one thread each)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n auto --maxprocesses 4

# the edit loop: everything but the tests marked slow (subprocesses, end-to-end stages, training)
test-fast: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n auto --maxprocesses 4 -m "not slow"

bench: $(STAMP)
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
