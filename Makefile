# ngp-research: two commands for a new user.
#   make demo   installs everything, seeds a demo platform into $(NGP_HOME) and prints it
#   make test   installs everything and runs the whole test suite
# Tested on Debian 12 with Python 3.11, Node 20 and Java 17.

PYTHON  ?= python3
VENV    ?= .venv
NGP_HOME ?= $(CURDIR)/.ngp-demo
export NGP_HOME
DEMO_PORT ?= 8000
IDP_PORT ?= 5556

BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
APT_STAMP := $(VENV)/.system-packages

# Debian packages the platform and its tests need.
APT_PACKAGES := postgresql bubblewrap python3-venv python3-dev libsqlite3-dev gcc chromium plink2 bcftools tabix

.PHONY: demo test bench bench-cohort install system-packages clean

install: $(STAMP)

system-packages: $(APT_STAMP)

$(APT_STAMP): Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml setup.py ngp_research/kernel/_hook.c hub/idp/package-lock.json hub/proxy/package-lock.json | $(APT_STAMP)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	cd hub/idp && npm ci --no-audit --no-fund --loglevel=error
	cd hub/proxy && npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: $(STAMP) workspace-env
	@echo "Try, in another terminal:  NGP_HOME=$(NGP_HOME) $(BIN)/ngp access files cardio-gwas --user alice"
	$(BIN)/ngp demo start --port $(DEMO_PORT) --idp-port $(IDP_PORT)

test: $(STAMP) workspace-env
	$(BIN)/python -m pytest

bench: $(STAMP) workspace-env
	$(BIN)/python benchmarks/run.py

# The cohort analysis benchmark (issue 5): our Cohort API beside plain Hail, PLINK 2 and bcftools on
# 5,000 samples x 100,000 variants; 20-40 minutes, so not part of `make bench`. Needs plink2, bcftools
# and Java 17. Extra options: make bench-cohort BENCH_ARGS=--quick
bench-cohort: $(STAMP)
	$(BIN)/python benchmarks/cohort.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .ngp-demo .pytest_cache .hypothesis

# The workspaces' own Python environment (Debian's python3, readable by every workspace uid; see
# ngp_research/workspace/environment.py), rebuilt when the project's sources change.
NGP_WORKSPACE_ENV ?= /opt/ngp-research/envs/$(shell printf %s '$(CURDIR)' | sha256sum | cut -c1-12)
export NGP_WORKSPACE_ENV
WORKSPACE_ENV_STAMP := $(NGP_WORKSPACE_ENV)/.ngp-built

.PHONY: workspace-env
workspace-env: $(WORKSPACE_ENV_STAMP)

$(WORKSPACE_ENV_STAMP): pyproject.toml setup.py $(shell find ngp_research -name '*.py' -o -name '*.c') kernels/ngp-python/kernel.json $(wildcard spawner/jupyter/*) | $(STAMP)
	$(BIN)/python -m ngp_research.workspace.environment build $(NGP_WORKSPACE_ENV)
