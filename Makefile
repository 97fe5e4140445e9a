# contgen — `make install && python train.py` (or `make demo`), and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: help install demo test test-slow test-all test-gpu bench bench-ucgm bench-shortcut clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(PY):
	python3 -m venv $(VENV)

install: $(PY)  ## create .venv and install contgen with its test tools
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[dev]"
	@echo "activate with: source $(VENV)/bin/activate"

demo: install  ## install, then train the built-in default (small MAR on shapes, CPU-friendly)
	$(PY) train.py

test:  ## fast test tier (< ~10 min on 2 CPU cores)
	$(PY) -m pytest -m "not slow and not gpu" -q

test-slow:  ## slower end-to-end checks (CI runs them too)
	$(PY) -m pytest -m "slow and not gpu" -q

test-all:  ## everything that runs without a GPU
	$(PY) -m pytest -m "not gpu" -q

test-gpu:  ## GPU checks (skip cleanly without one)
	$(PY) -m pytest -m gpu -q

bench:  ## GPU speed, one JSON line per case; REF=<dir holding mar/ and EAR/ checkouts> adds the reference, same run
	$(PY) bench/mar_ear.py $(if $(REF),--reference-root $(REF),--sides contgen) $(BENCH_ARGS)

bench-ucgm:  ## UCGM TiT-XL/2 speed; REF=<UCGM checkout, ae74912> adds the reference, same run
	$(PY) bench/ucgm.py $(if $(REF),--reference-root $(REF),--sides contgen) --isolate side $(BENCH_ARGS)

bench-shortcut:  ## Shortcut DiT-B/2 train step + 1/4/128-step sampling; REF=<kvfrans/shortcut-models 6010043> adds the JAX reference, same run
	$(PY) bench/shortcut.py $(if $(REF),--reference-root $(REF),--sides contgen) --isolate side $(BENCH_ARGS)

clean:  ## remove run outputs and caches
	rm -rf outputs multirun .pytest_cache
