# One-command setup and the everyday targets. See README.md.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PROTO_SRC := $(wildcard protos/minicpmo/v1/*.proto)

.PHONY: setup venv deps proto kernels redis chromium test fuzz run bench k8s-validate lint clean

setup: venv deps proto kernels redis chromium  ## everything a fresh Debian machine needs

venv:
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

deps: venv
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .

# Stubs are generated, not committed: same grpcio-tools (pinned) + same inputs = same files.
proto: deps
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)

# The CPU decode attention kernel (C++), built once into torch's extension cache so no replica builds it while serving.
kernels: deps
	$(BIN)/minicpmo build-kernels

redis:
	@command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
	@redis-server --version

# The browser of the web-page test: Debian's chromium (Playwright drives it; it never downloads a browser).
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@chromium --version 2>/dev/null

test:
	$(BIN)/python -m pytest tests -q

# Property-based fuzzing of the public API against a fresh local stack (long campaign; `make test` runs a short one).
# Writes bench/results/fuzz.json; fails when any case broke a promise, restarted a replica or hurt another caller.
FUZZ_EXAMPLES ?= 1000
fuzz:
	RAY_AUTH_MODE=disabled $(BIN)/python -m tests.fuzz.campaign --examples $(FUZZ_EXAMPLES)

run:
	$(BIN)/minicpmo serve

bench:
	$(BIN)/minicpmo bench all

k8s-validate:
	$(BIN)/python -m pytest tests/deploy -q

lint:
	duplicates --most 20 || true

clean:
	rm -rf $(VENV) .run build *.egg-info
	find protos -name '*_pb2*.py*' -delete
