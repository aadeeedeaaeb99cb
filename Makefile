# Every target works on a fresh machine: demo and test install first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Triton Inference Server for `--runtime triton` and its tests (../shared/reference/triton-on-cpu.md):
# the server inside nvidia-pytriton, in a venv of its own because it needs numpy 1.x (under numpy 2
# the Python backend answers with empty outputs) and would drag .venv's pins back to old releases.
TRITON_VENV := .triton-venv
TRITON_SERVER := $(TRITON_VENV)/server
TRITON_STAMP := $(TRITON_VENV)/.installed

# checkov (policy checks of deploy/k8s and deploy/Dockerfile in tests/deploy) in a venv of its own: it pins
# boto3 1.35, whose botocore s3fs's aiobotocore refuses.
CHECKOV_VENV := .checkov-venv
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: install triton demo test proto proto-check lint typecheck bench clean image

install: $(STAMP) $(TRITON_STAMP) $(CHECKOV_STAMP)
	@command -v etcd >/dev/null 2>&1 || { \
	  echo "installing etcd-server from Debian"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server etcd-client) >/dev/null \
	  || { echo "could not install etcd-server (need root or sudo)"; exit 1; }; }
	@# nft and ip: the multi-host tests (tests/integration/test_hosts.py) filter and cut links inside namespaces.
	@command -v nft >/dev/null 2>&1 && command -v ip >/dev/null 2>&1 || { \
	  echo "installing nftables and iproute2 from Debian"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2) >/dev/null \
	  || echo "could not install nftables/iproute2: the multi-host tests will skip"; }

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,plot]'
	touch $(STAMP)

triton: $(TRITON_STAMP)

$(CHECKOV_STAMP):
	test -x $(CHECKOV_VENV)/bin/python || $(PY) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/pip install -q checkov==3.3.30
	touch $(CHECKOV_STAMP)

# The server tree is copied out of site-packages so its backends folder can hold the one stub for this
# Python; the stub links libpython3.11.so.1.0, which Debian's libpython3.11 provides when nothing does.
$(TRITON_STAMP):
	test -x $(TRITON_VENV)/bin/python || $(PY) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q --upgrade pip
	$(TRITON_VENV)/bin/pip install -q nvidia-pytriton==0.7.0 onnxruntime==1.31.1
	site=$$($(TRITON_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	rm -rf $(TRITON_SERVER) && cp -r $$site/pytriton/tritonserver $(TRITON_SERVER) && \
	rm -rf $(TRITON_SERVER)/python_backend_stubs && \
	cp $$site/pytriton/tritonserver/python_backend_stubs/3.11/triton_python_backend_stub $(TRITON_SERVER)/backends/python/ && \
	if LD_LIBRARY_PATH=$$site/nvidia_pytriton.libs ldd $(TRITON_SERVER)/backends/python/triton_python_backend_stub \
	    | grep -q 'libpython3.11.so.1.0 => not found'; then \
	  echo "installing libpython3.11 from Debian"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libpython3.11) >/dev/null \
	  || { echo "could not install libpython3.11 (need root or sudo)"; exit 1; }; \
	fi
	touch $(TRITON_STAMP)

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

# The node's container image (deploy/Dockerfile, deploy/README.md), with docker or else podman, whichever can
# build here; without either it says so and builds nothing.
IMAGE ?= meshserve:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	@# BuildKit reads deploy/Dockerfile.dockerignore by itself; podman is told.
	@if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then engine=docker; ignore=; \
	elif command -v podman >/dev/null 2>&1 && podman info >/dev/null 2>&1; then \
	  engine=podman; ignore="--ignorefile deploy/Dockerfile.dockerignore"; \
	else echo "make image: no container engine that can build here (neither docker with a running daemon nor" \
	  "podman): image $(IMAGE) not built"; exit 0; fi; \
	echo "building $(IMAGE) with $$engine"; \
	$$engine build --file deploy/Dockerfile $$ignore --tag $(IMAGE) . && $$engine image ls $(IMAGE)

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(CHECKOV_VENV) .pytest_cache .mypy_cache .ruff_cache
