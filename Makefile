# gpcl-trt: `make test` and `make demo` work from a fresh clone (they set up .venv first).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS := rtx,triton,demo,test

.PHONY: all setup test test-all test-fast demo kernel clean help

help:
	@echo "make demo   - set up if needed, then run the whole pipeline on the embedded MiniLM"
	@echo "make test   - set up if needed, then ruff (lint + format check) and CI's lane: the tests not marked slow plus one family of each kind (marker lane)"
	@echo "make test-all - the same with every test, slow ones included (family corpus, live tritonserver, large builds)"
	@echo "make test-fast - the tests not marked slow only (a quick check while working)"
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

# CI's lane (`.ci/run`), well under 20 minutes on 2 cores: every test not marked slow, plus the
# tests marked `lane`: one family of each kind (encoder, decoder, vision, hierarchical vision,
# dual encoder, audio, encoder-decoder) through export, sites, insert, strip, diff, the pipeline
# and the structural site pass. The whole suite takes longer than CI's budget allows.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -ra -m "not slow or lane" tests

# Every test, the slow ones included (every corpus family, live tritonserver, full pipelines).
test-all: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -ra tests

# Everything but the tests marked slow: a quick check while working.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -ra -m "not slow" tests

demo: $(STAMP)
	$(VENV)/bin/gpcl-trt pipeline -o demo_out

kernel:
	cmake -S plugins/gpcl -B build/gpcl -DCMAKE_BUILD_TYPE=Release
	cmake --build build/gpcl -j 2

clean:
	rm -rf build demo_out .pytest_cache
