# `make demo` and `make test` create the virtual environment when it is missing; both are idempotent.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test install bench clean

install: $(VENV)/.installed

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstalled whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[test]'
	touch $@

demo: install
	$(BIN)/longtail demo

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) longtail-demo campaigns .pytest_cache
