# Every target bootstraps .venv with uv on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PINS    := constraints.txt
ARGS    ?=

.PHONY: install pins serve test test-slow demo repro bench proto lint clean

$(BIN)/uv:
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet --disable-pip-version-check uv

# Installs exactly the versions pinned in $(PINS) (see `make pins`).
$(STAMP): pyproject.toml $(PINS) | $(BIN)/uv
	$(BIN)/uv pip install --python $(BIN)/python -c $(PINS) -e '.[server,dev]'
	@touch $(STAMP)

install: $(STAMP)

# Re-resolves $(PINS) from pyproject.toml, keeping every pin that still fits (no registry URLs in it).
# Newer versions: make pins ARGS=--upgrade, or ARGS='--upgrade-package torch'; then make install.
pins: | $(BIN)/uv
	$(BIN)/uv pip compile pyproject.toml --extra server --extra dev --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-emit-index-url --no-emit-find-links \
		--custom-compile-command 'make pins' --quiet -o $(PINS) $(ARGS)

serve: $(STAMP)
	$(BIN)/lethe serve --no-auth $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow $(ARGS)

demo: $(STAMP)
	$(BIN)/python examples/demo.py $(ARGS)

repro: $(STAMP)
	$(BIN)/python -m benchmarks.reproduce $(ARGS)

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run $(ARGS)

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protos/lethe.proto
	$(BIN)/python -m grpc_tools.protoc -I . --descriptor_set_out=protos/inference.desc protos/inference.proto

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
