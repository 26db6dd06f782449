# autoport: quick start and developer targets.
#   make demo   - install everything, start a lab on loopback and run a migration
#   make test   - install everything and run the whole suite
#   make lint   - ruff + mypy
SHELL := /bin/bash
VENV  ?= .venv
PY    := $(VENV)/bin/python
APT_LIST := deploy/apt-packages.txt
DEMO_DIR ?= /tmp/autoport-demo
PYTEST_ARGS ?=

.PHONY: install install-apt install-venv demo demo-down test lint clean debroot

install: install-apt install-venv

# apt: only what is missing, from the single list in deploy/apt-packages.txt.
install-apt:
	@bash deploy/install-apt.sh $(APT_LIST)

# venv: rebuilt only when pyproject.toml changes.
install-venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[postgres,milter,test]'
	@touch $@

demo: install
	$(VENV)/bin/autoport demo --dir $(DEMO_DIR)

demo-down:
	-$(VENV)/bin/autoport lab down --dir $(DEMO_DIR)

test: install lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: install-venv
	$(VENV)/bin/ruff check sidecar tests bench fuzz
	$(VENV)/bin/mypy

# The Debian 13 root (Dovecot 2.4, Postfix 3.10) the 2.4 tests use; built once per machine (the tests build it
# too when it is missing). See docs/dovecot24.md.
debroot: install
	$(VENV)/bin/autoport lab debroot --dir /var/cache/autoport/debian13-root

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
