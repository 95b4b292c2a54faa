# ktls -- the two set-up commands are `make test` and `make serve` (see README.md).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
KERNEL := $(PYTHON) tools/testkernel.py
# Debian packages the tests use: openssl, gnutls-bin and curl are real peers; nginx and wrk
# are the serve benchmark's reference server and load, stunnel4 the wrap benchmark's
# reference; the rest run the UML test kernels (tools/testkernel.py provision installs
# those itself too).
DEBS   := openssl gnutls-bin curl user-mode-linux kmod iproute2 patchelf nginx wrk stunnel4

.PHONY: test serve demo probe lint types host-tests kernel-tests bench bench-check setup system clean

setup: $(STAMP) system

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

system:
	@missing=$$(for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	$(KERNEL) provision --kernel all

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests tools bench
	$(VENV)/bin/ruff format --check src tests tools bench

types: $(STAMP)
	$(VENV)/bin/mypy

# Unit tests and everything on the software engine, on the host.  Kernel-engine tests
# run in real kernels: UML 6.1 (Debian 12) and UML 7.x (Debian sid), and on the host
# too when its kernel has kTLS.  The "noktls" group runs in a kernel without the tls
# module.  Every run prints the kernel it ran on and what ran on the kernel engine.
host-tests: $(STAMP)
	@echo "== host: unit tests and the software engine"
	$(PY) -m pytest -m "not kernel and not noktls"

kernel-tests: $(STAMP) system
	@echo "== UML 6.1 without the tls module: what users get when the kernel can't"
	$(KERNEL) run --kernel 6.1 --no-modules -- $(PY) -m pytest -m noktls
	@echo "== UML 6.1: the kernel engine"
	$(KERNEL) run --kernel 6.1 -- $(PY) -m pytest -m kernel
	@echo "== UML 7.x: the kernel engine, with TLS 1.3 rekey"
	$(KERNEL) run --kernel 7 -- $(PY) -m pytest -m kernel
	@if $(PY) -c 'import sys, ktls; sys.exit(not ktls.capabilities().ulp)'; then \
	  echo "== host kernel has kTLS: the kernel engine on the host too"; \
	  $(PY) -m pytest -m kernel; \
	fi

test: setup lint types host-tests kernel-tests bench-check

# Benchmarks (bench/, see README "Benchmarks"): on the host and inside UML 7.x, one table,
# one JSON (bench/results/latest.json).  BENCH_ARGS passes options, e.g. BENCH_ARGS="--runs 3".
# The serve suite's chart: bench/results/serve.png (matplotlib, the "bench" extra).
bench: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.serve.chart --json bench/results/latest.json --png bench/results/serve.png

# The bench once on tiny sizes, host and UML 7.x: proves the tool works (no timing asserts).
bench-check: setup
	$(PY) -m bench --quick --json bench/results/quick.json

# What this kernel's TLS layer can do, on the host and in each test kernel.
probe: setup
	$(VENV)/bin/ktls probe
	$(KERNEL) run --kernel 6.1 -- $(VENV)/bin/ktls probe
	$(KERNEL) run --kernel 7 -- $(VENV)/bin/ktls probe

# The main job: `ktls serve` on SERVE_DIR (default: this directory) at https://localhost:8443
# with a fresh self-signed certificate; SERVE_ARGS adds options (see `ktls serve --help`).
SERVE_DIR  ?= .
SERVE_ARGS ?=
serve: setup
	$(VENV)/bin/ktls serve $(SERVE_DIR) $(SERVE_ARGS)

# A real HTTPS request through the kernel's TLS inside UML 7.x, for hosts without kTLS
# (tools/demo.py).
demo: setup
	$(VENV)/bin/ktls probe
	$(KERNEL) run --kernel 7 -- $(PY) tools/demo.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
