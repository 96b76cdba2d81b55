# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= out/tiny-onnx-int4

.PHONY: install demo test test-unit test-slow lint format bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(BIN)/pip install --quiet -e '.[onnx,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lfm-export onnx tiny -o $(DEMO_OUT) --quant int4 --force
	$(BIN)/lfm-export run $(DEMO_OUT) --prompt "Once upon a time" --max-new-tokens 120
	$(BIN)/lfm-export run $(DEMO_OUT) --chat --prompt "What does a cow say?" --max-new-tokens 40

# Two workers, one test file each at a time (module fixtures built once): the suite is mostly single-threaded
# tracing and lowering (load average about 1.0 during a serial run), 615 s serial on the 2-core VM.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# The fast unit tier: recipe grammar and config, quantizer, gates and parity core, sampler, interpreter ops.
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "unit and not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/actionlint examples/ci/github/lfm-export.yml

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf out .pytest_cache
