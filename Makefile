# seqserve: `make serve` runs the server on the shipped models; `make test` runs every check.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
GRPC_PORT ?= 50051
METRICS_PORT ?= 8000
PROTO_SRC := proto/seqserve/v1/seqserve.proto

.PHONY: serve test lint typecheck pytest proto proto-check venv-serve venv-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Serving install: no torch, no extras (a venv that already has the editable dev install keeps it).
$(VENV)/.serve-installed: $(BIN)/python pyproject.toml
	if [ ! -f $(VENV)/.dev-installed ]; then $(BIN)/pip install --quiet .; fi
	touch $@

# Development install: serving + train + dev extras (torch==2.13.0 CPU).
$(VENV)/.dev-installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e '.[train,dev]'
	touch $@

venv-serve: $(VENV)/.serve-installed
venv-dev: $(VENV)/.dev-installed

serve: $(VENV)/.serve-installed
	$(BIN)/seqserve serve --model-repository models --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

proto: $(VENV)/.dev-installed
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
		--grpc_python_out=proto --mypy_grpc_out=proto $(PROTO_SRC)

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(VENV)/.dev-installed
	$(BIN)/mypy

pytest: $(VENV)/.dev-installed
	$(BIN)/python -m pytest

test: lint typecheck pytest

clean:
	rm -rf $(VENV) build dist *.egg-info .mypy_cache .ruff_cache .pytest_cache
