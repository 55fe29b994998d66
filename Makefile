# Set-up and the two entry points of the README. `make demo` and `make test` create the virtual
# environment on first use (torch 2.14.1 and friends, pinned in pyproject.toml) and reuse it after.
VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast browser debug clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/multimodal demo

# headless Chromium for tests/test_browser.py: Debian's chromium and chromium-driver, installed where root can
# (a fresh Debian, CI); elsewhere the browser tests skip and say why
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
			>/dev/null 2>&1 || echo "could not install chromium: tests/test_browser.py will skip"; \
	else echo "no chromium and not root to install it: tests/test_browser.py will skip"; fi

# two workers, one a core, each test file on one of them, the slow files first (tests/conftest.py gives each
# worker one torch thread and orders the files)
test: $(STAMP) browser
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

test-fast: $(STAMP) browser
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

debug: $(STAMP)
	$(VENV)/bin/multimodal train --config configs/debug.yaml

clean:
	rm -rf runs lightning_logs .pytest_cache
