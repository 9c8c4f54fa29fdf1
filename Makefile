# `make run` and `make test` work on a fresh machine: they create .venv and install what is missing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# chromium: the browser test drives Debian's headless Chromium (no browser download).
SYSTEM_PACKAGES := openssh-server openssh-client iproute2 nftables chromium tini tcsh zsh fish

# No telemetry from Prefect; a cold ephemeral API needs more than the default 20 s on 2 cores.
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120

.PHONY: run test lint bench system-deps clean bytecode

run: $(VENV)/.installed bytecode
	$(BIN)/python -m flows.example_pipeline

test: $(VENV)/.installed system-deps lint bytecode
	$(BIN)/python -m pytest

# Our own sources compiled once: no installer compiles an editable checkout, and where the
# shell sets PYTHONDONTWRITEBYTECODE (this machine's does) every process that imports them,
# the suite's controllers and CLI runs among them, compiled them again (0.15 s of CPU each).
bytecode: $(VENV)/.installed
	$(BIN)/python -m compileall -q -j 0 lazycluster_tasks tests benchmarks flows deployments

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/deptry .

bench: $(VENV)/.installed-bench system-deps bytecode
	$(BIN)/python -m benchmarks.run_all

# uv installs the dependencies in about half the time pip takes; compiled to bytecode, as pip
# does (the test hosts' Dask processes import from this venv).
UV := $(BIN)/uv pip install --quiet --python $(BIN)/python --compile-bytecode

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet uv
	$(UV) -e '.[test]'
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(UV) -e '.[test,bench]'
	touch $@

# Test hosts need sshd, ip, nft and tini (a reaper per host, as its init), the login shells users
# have (tcsh, zsh, fish), the browser test chromium; apt-get installs them as root.
system-deps:
	@if [ "$$(id -u)" = 0 ] && ! { [ -x /usr/sbin/sshd ] && command -v ip >/dev/null && command -v nft >/dev/null \
		&& command -v chromium >/dev/null && command -v tini >/dev/null \
		&& command -v tcsh >/dev/null && command -v zsh >/dev/null && command -v fish >/dev/null; }; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES) \
		|| { apt-get update && apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); }; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
