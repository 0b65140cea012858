# The two set-up commands: `make serve` and `make test`. Both install what is missing.
BUILD ?= build
KVTRIM_CACHE ?= $(HOME)/.cache/kvtrim
export KVTRIM_CACHE
MODEL ?= $(KVTRIM_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
JOBS ?= $(shell nproc)
FUZZ_SECONDS ?= 60
# The interpreter the test venv is made from: Debian's /usr/bin/python3 (python3-venv) or any
# python3 >= 3.9 on the PATH.
PYTHON ?= python3
PYENV := $(BUILD)/pyenv

.PHONY: deps build model serve test unit pyenv fuzz sanitize goldens format clean

deps:
	@tools/setup/install_deps.sh

$(BUILD)/CMakeCache.txt: | deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

model: deps
	@tools/setup/fetch_model.sh >/dev/null

# Starts kvtrim-server on the test model, prints its address and its answer to a sample chat
# question, and serves until Ctrl-C (which drains it). From another shell:
#   build/tools/kvtrim generate --server localhost:50051 --chat "Hi"
LISTEN ?= 0.0.0.0:50051
METRICS_PORT ?= 9400
serve: build model
	tools/setup/serve.sh $(BUILD) $(MODEL) $(LISTEN) $(METRICS_PORT)

# The Python side of the server integration tests (tests/server/): grpcio, its code generator,
# health and reflection clients, pinned in requirements.txt. Remade when that file changes.
$(PYENV)/.installed: tests/server/requirements.txt | deps
	rm -rf $(PYENV)
	$(PYTHON) -m venv $(PYENV)
	$(PYENV)/bin/python -m pip install --quiet --disable-pip-version-check \
	  -r tests/server/requirements.txt
	touch $@

pyenv: $(PYENV)/.installed

unit: build model pyenv
	cd $(BUILD) && KVTRIM_MODEL=$(MODEL) ctest --output-on-failure -j $(JOBS)

fuzz: deps
	cmake -S . -B $(BUILD)-fuzz -DKVTRIM_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++
	cmake --build $(BUILD)-fuzz -j $(JOBS)
	tools/setup/run_fuzzers.sh $(BUILD)-fuzz $(FUZZ_SECONDS)

# The unit and server tests again, built with AddressSanitizer (LeakSanitizer included) and
# UndefinedBehaviorSanitizer: a read out of bounds, a leak or undefined behaviour fails the test
# it happens in, and a server that hits one exits non-zero, which fails its test. The host code
# only: this build leaves the CUDA backend out. allocator_may_return_null: a test asks for a pool
# too large to allocate and expects the error, which ASan would otherwise turn into an abort.
SAN_BUILD ?= $(BUILD)-sanitize
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
sanitize: model pyenv
	cmake -S . -B $(SAN_BUILD) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVTRIM_WITH_CUDA=OFF \
	  -DCMAKE_CXX_FLAGS="$(SAN_FLAGS)" -DCMAKE_EXE_LINKER_FLAGS="$(SAN_FLAGS)" \
	  -DKVTRIM_PYENV_PYTHON=$(abspath $(PYENV))/bin/python
	cmake --build $(SAN_BUILD) -j $(JOBS)
	cd $(SAN_BUILD) && KVTRIM_MODEL=$(MODEL) ASAN_OPTIONS=allocator_may_return_null=1 \
	  UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j $(JOBS)

test: unit fuzz sanitize

format:
	clang-format -i $$(git ls-files '*.cc' '*.h' '*.cu' '*.cuh')

clean:
	rm -rf $(BUILD) $(BUILD)-fuzz $(SAN_BUILD)
