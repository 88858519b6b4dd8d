# Two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# This machine's torch pins; pyproject.toml declares ranges that also accept the GPU images' torch 2.11.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: run test lint bench gpu-check install clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS)
	$(PY) -m pip install --quiet -e ".[test]" $(TORCH_PINS)
	touch $@

install: $(VENV)/.installed

# The main job on the embedded default: local Ray, the bundled photos, output in ./out/.
# Official R50 weights when reachable, else deterministic demo weights (loud warning, meaningless segments).
run: install
	$(PY) -m jobs.segment --input samples/images --output out --weights auto --allow-synthetic-weights
	$(PY) -m jobs.query out "SELECT category, count(*) AS segments, count(DISTINCT image_id) AS images FROM segments GROUP BY 1 ORDER BY 2 DESC LIMIT 10"

test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

bench: install
	$(PY) -m bench.run

# The GPU hour, prepared: every GPU claim measured by one command inside a hard budget (default 7 min),
# results in bench/results/gpu-<date>.json + .md (bench/gpu.py). CI runs its CPU variant
# (`bench.gpu --device cpu --quick`, tests/bench/test_gpu.py). E.g. GPU_CHECK_ARGS="--weights ckpt.pth".
GPU_CHECK_ARGS ?=
gpu-check: install
	$(PY) -m bench.gpu $(GPU_CHECK_ARGS)

# The main job's output and the README walkthrough's files.
clean:
	rm -rf out coco cat.png grid.png show.png .pytest_cache
