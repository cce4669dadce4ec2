# `make demo` and `make test` create the virtual environment when it is missing; both are idempotent.
# `make test` also installs Debian's headless Chromium when it is missing (the report tests render the
# page in it; this closed network can install no other browser), as root through apt-get.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CHROMIUM_PACKAGES ?= chromium

.PHONY: demo test install browser monitoring bench clean

install: $(VENV)/.installed

# Debian's python3 lacks ensurepip until python3-venv is installed: install it when root, else say so.
$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { rm -rf $(VENV); \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make: $(PYTHON) cannot create a virtual environment; installing Debian's python3-venv"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-venv \
		&& $(PYTHON) -m venv $(VENV); \
	else echo "make: $(PYTHON) -m venv failed; install python3-venv (sudo apt-get install python3-venv), then run make again"; exit 2; fi; }

# Reinstalled whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[test]'
	touch $@

# Chromium for the report tests (and the browser tests): Debian's package, installed once.
browser:
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make: chromium is missing; installing Debian's package: apt-get install -y --no-install-recommends $(CHROMIUM_PACKAGES)"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(CHROMIUM_PACKAGES); \
	else \
		echo "make: chromium is missing and cannot be installed from here (needs root and apt-get); the report tests render"; \
		echo "      the page in it. Install it, then run make test again: sudo apt-get install -y --no-install-recommends chromium"; \
		exit 2; \
	fi

demo: install
	$(BIN)/longtail demo

# Prometheus for the metrics test (tests/test_dashboard.py, `longtail monitor`): Debian's package, installed once.
monitoring:
	@if command -v prometheus >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "make: prometheus is missing; installing Debian's package: apt-get install -y --no-install-recommends prometheus"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends prometheus; \
	else \
		echo "make: prometheus is missing and cannot be installed from here (needs root and apt-get); the metrics test"; \
		echo "      runs it. Install it, then run make test again: sudo apt-get install -y --no-install-recommends prometheus"; \
		exit 2; \
	fi

test: install browser monitoring
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) longtail-demo campaigns .pytest_cache
