# Every target works on a fresh machine: demo and test install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test proto proto-check lint typecheck bench clean

install: $(STAMP)
	@command -v etcd >/dev/null 2>&1 || { \
	  echo "installing etcd-server from Debian"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client) >/dev/null \
	  || { echo "could not install etcd-server (need root or sudo)"; exit 1; }; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Generated code is committed; proto-check fails when it drifts from proto/.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. proto/meshpb/*.proto

proto-check: $(STAMP)
	@tmp=$$(mktemp -d) && \
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$$tmp --pyi_out=$$tmp proto/meshpb/*.proto && \
	for f in $$tmp/meshpb/*; do diff -u meshpb/$$(basename $$f) $$f || { echo "meshpb/ is stale: run 'make proto'"; rm -rf $$tmp; exit 1; }; done; \
	rm -rf $$tmp; echo "proto-check: generated code is current"

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: install proto-check lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

demo: install
	$(BIN)/python -m deploy.local.demo

bench: install
	$(BIN)/python -m bench.node_vs_floor

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
