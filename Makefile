# Two commands on a fresh Debian/Ubuntu machine (README, Quick start): each installs what is
# missing first (scripts/install.sh: the Fashion-MNIST package, .venv, torch, the package), then
# runs. The install is redone only when pyproject.toml or the install script changed.
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint install

demo: $(STAMP)
	$(VENV)/bin/scar demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh
	touch $@
