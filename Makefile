# Two commands a new user needs: `make demo` (or `make bench`) to run, `make test` to test.
# Everything installs into .venv; a venv that already has torch keeps it, otherwise torch
# comes from the CPU build so a CPU-only machine never downloads CUDA wheels.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.sinklora-installed

.PHONY: install test test-gpu demo bench warm-gpu-cache clean

$(VPY):
	$(PY) -m venv $(VENV)

$(STAMP): $(VPY) setup.py
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install "torch==2.13.*"
	$(VPY) -m pip install -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VPY) -m pytest -q tests

# The whole suite compiled on a CUDA GPU (bf16 included), never the interpreter. It runs from
# the working tree with a python that already has the GPU stack and pytest (GPU_PY, default
# python3), installing nothing: GPU machines often have no package registry.
GPU_PY ?= python3
test-gpu:
	TRITON_INTERPRET=0 PYTHONPATH=$(CURDIR) $(GPU_PY) -m pytest -q tests

# A Triton cache for the GPU machine's first-light call (bench.warm_triton_cache), made
# here with that machine's Triton, 3.6.0, in a venv of its own; the call carries build/triton-cache.
WARM_VENV := build/warm-venv
warm-gpu-cache:
	$(PY) -m venv $(WARM_VENV)
	$(WARM_VENV)/bin/python -c "import torch" 2>/dev/null \
		|| $(WARM_VENV)/bin/python -m pip install "torch==2.13.*"
	$(WARM_VENV)/bin/python -m pip install -q "triton==3.6.0" -e ".[test]"
	$(WARM_VENV)/bin/python -m bench.warm_triton_cache

demo: $(STAMP)
	$(VPY) -m sinklora.demo

# Results go to build/bench (ignored by git): `make bench` leaves a clone clean; the committed
# runs in bench/results change only with --results-dir bench/results.
bench: $(STAMP)
	$(VPY) -m bench.run_all

clean:
	rm -rf $(VENV) build *.egg-info
