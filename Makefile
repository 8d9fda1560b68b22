# `make run`: set everything up and run the main job.  `make test`: set everything up and run the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup data run test clean

setup: $(STAMP)

# torch is installed first and pinned, so pip takes the CPU build rather than a multi-GB CUDA one.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

data:
	bash scripts/install-data.sh

run: setup data
	$(VENV)/bin/smartsplit compare configs/fmnist.yaml --strategies fedavg,splitfed,smartsplit --overwrite

# the tests that read Fashion-MNIST need it: install it where we can, else they skip and say why
test: setup
	bash scripts/install-data.sh || echo "Fashion-MNIST not installed: the tests that need it will be skipped"
	$(VENV)/bin/lint-imports
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs
