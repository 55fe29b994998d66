# Set-up and the two entry points of the README. `make demo` and `make test` create the virtual
# environment on first use (torch 2.14.1 and friends, pinned in pyproject.toml) and reuse it after.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast debug clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/multimodal demo

# two workers, one a core, each test file on one of them, the slow files first (tests/conftest.py gives each
# worker one torch thread and orders the files)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

debug: $(STAMP)
	$(VENV)/bin/multimodal train --config configs/debug.yaml

clean:
	rm -rf runs lightning_logs .pytest_cache
