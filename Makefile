# ngp-research: two commands for a new user.
#   make demo   installs everything, seeds a demo platform into $(NGP_HOME) and prints it
#   make test   installs everything and runs the whole test suite
# Tested on Debian 12 with Python 3.11, Node 20 and Java 17.

PYTHON  ?= python3
VENV    ?= .venv
NGP_HOME ?= $(CURDIR)/.ngp-demo
export NGP_HOME

BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
APT_STAMP := $(VENV)/.system-packages

# Debian packages the platform and its tests need.
APT_PACKAGES := postgresql bubblewrap

.PHONY: demo test bench install system-packages clean

install: $(STAMP)

system-packages: $(APT_STAMP)

$(APT_STAMP):
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml hub/idp/package-lock.json | $(APT_STAMP)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	cd hub/idp && npm ci --no-audit --no-fund --loglevel=error
	touch $@

demo: $(STAMP)
	$(BIN)/ngp demo seed
	@echo
	@echo "Try:  NGP_HOME=$(NGP_HOME) $(BIN)/ngp access files cardio-gwas --user alice"
	@echo "      NGP_HOME=$(NGP_HOME) $(BIN)/ngp audit verify"

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) .ngp-demo .pytest_cache .hypothesis
