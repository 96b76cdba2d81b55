# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= out/tiny-onnx-int4

.PHONY: install demo test test-unit test-slow lint format bench clean

# llama-cpp-python compiles llama.cpp with -march=native. Some x86 virtual machines advertise AMX in cpuid but
# cannot execute it (firecracker guests on Sapphire Rapids: SIGILL on `tilezero` at the first quantized matmul), so
# AMX is left out on x86-64; every other extension the CPU has stays on.
NATIVE_FLAGS := $(if $(filter x86_64 amd64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16,)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	CMAKE_BUILD_PARALLEL_LEVEL=2 CFLAGS="$(NATIVE_FLAGS)" CXXFLAGS="$(NATIVE_FLAGS)" \
		$(BIN)/pip install --quiet -e '.[onnx,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/lfm-export onnx tiny -o $(DEMO_OUT) --quant int4-b128-gptq --force
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
