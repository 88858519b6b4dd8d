# Two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# This machine's torch pins; pyproject.toml declares ranges that also accept the GPU images' torch 2.11.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: run test lint bench install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[test]" $(TORCH_PINS)
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m jobs.segment --input samples/images --output out --weights auto --device auto

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench.run

clean:
	rm -rf out .pytest_cache
