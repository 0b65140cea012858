# The two set-up commands: `make serve` and `make test`. Both install what is missing.
BUILD ?= build
KVTRIM_CACHE ?= $(HOME)/.cache/kvtrim
export KVTRIM_CACHE
MODEL ?= $(KVTRIM_CACHE)/SmolLM2-135M-Instruct.Q4_1.gguf
JOBS ?= $(shell nproc)
FUZZ_SECONDS ?= 60

.PHONY: deps build model serve test unit fuzz goldens format clean

deps:
	@tools/setup/install_deps.sh

$(BUILD)/CMakeCache.txt: | deps
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release

build: deps $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j $(JOBS)

model: deps
	@tools/setup/fetch_model.sh >/dev/null

serve: build model
	$(BUILD)/tools/kvtrim generate --model $(MODEL) --chat "What is the capital of France?" --max-tokens 64

unit: build model
	cd $(BUILD) && KVTRIM_MODEL=$(MODEL) ctest --output-on-failure -j $(JOBS)

fuzz: deps
	cmake -S . -B $(BUILD)-fuzz -DKVTRIM_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++
	cmake --build $(BUILD)-fuzz -j $(JOBS)
	tools/setup/run_fuzzers.sh $(BUILD)-fuzz $(FUZZ_SECONDS)

test: unit fuzz

format:
	clang-format -i $$(git ls-files '*.cc' '*.h' '*.cu' '*.cuh')

clean:
	rm -rf $(BUILD) $(BUILD)-fuzz
