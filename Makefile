# gpcl-trt: `make test` and `make demo` work from a fresh clone (they set up .venv first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS := rtx,triton,demo,test

.PHONY: all setup test test-fast test-lane demo kernel clean help

help:
	@echo "make demo   - set up if needed, then run the whole pipeline on the embedded MiniLM"
	@echo "make test   - set up if needed, then ruff (lint + format check) and the tests"
	@echo "make test-fast - the same without the tests marked slow (family corpus, live tritonserver, large builds)"
	@echo "make test-lane - CI's lane: test-fast plus one family of each kind through the slow corpus tests (marker lane)"
	@echo "make kernel - build the GPCL CUDA kernel library (and the TensorRT plugin if TENSORRT_ROOT is set)"

setup: $(STAMP)

# torch is installed first and pinned: 2.13.0 is the CPU wheel on this disk; an open range
# would pull a multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -ra tests

# Everything but the tests marked slow: a quick check while working; `make test` is the one of record.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -ra -m "not slow" tests

# CI's lane: everything test-fast runs, plus the tests marked `lane`: one family of each kind
# (encoder, decoder, vision, hierarchical vision, dual encoder, audio, encoder-decoder) through
# export, sites, insert, strip, diff, the pipeline and the structural site pass.
test-lane: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -ra -m "not slow or lane" tests

demo: $(STAMP)
	$(VENV)/bin/gpcl-trt pipeline -o demo_out

kernel:
	cmake -S plugins/gpcl -B build/gpcl -DCMAKE_BUILD_TYPE=Release
	cmake --build build/gpcl -j 2

clean:
	rm -rf build demo_out .pytest_cache
