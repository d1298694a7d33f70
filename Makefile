CARGO ?= cargo
PYTHON ?= python3
export PYTHON

BIN_DIR := $(CURDIR)/target/debug

.PHONY: services venv build run migrate test fuzz fmt lint clean

services:
	bash scripts/services.sh

venv:
	bash scripts/venv.sh

build:
	$(CARGO) build --workspace --bins

run: services build
	BIN_DIR=$(BIN_DIR) bash scripts/run.sh

migrate: services build
	$(BIN_DIR)/web --config celeryconfig.toml --migrate

test: services venv
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace
	bash scripts/chromium.sh
	RCELERY_BIN_DIR=$(BIN_DIR) .venv/bin/pytest -q interop

# Property-based fuzzing of the wire decoders, bounded: PROPTEST_CASES inputs per property.
fuzz:
	PROPTEST_CASES=$${PROPTEST_CASES:-20000} $(CARGO) test -p runtime --release --test decode_fuzz

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --all-targets -- -D warnings

clean:
	$(CARGO) clean
	rm -rf .venv .pytest_cache interop/.pytest_cache interop/artifacts
