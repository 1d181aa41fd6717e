# The two commands: `make serve` and `make test`. Both create .venv when missing.
VENV  ?= .venv
PY    := $(VENV)/bin/python
ROUTE ?= auto
PORT  ?= 30000
# A named real model for `make model` and `make serve` (sglang_vase.models.NAMED_MODELS), e.g.
# MODEL=qwen2.5-coder-1.5b; empty: the embedded SmolLM2-135M
MODEL ?=
# Extra flags for `make serve`, e.g. ARGS="--vase-budget 512 --model-path /models/Qwen3-4B"
ARGS  ?=
# Extra pytest flags for `make test`, e.g. PYTEST_ARGS="-m 'not slow'"
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`, each running whole files (a file's servers are shared by
# its tests) in the order tests/conftest.py sets (server files first). Not --dist loadgroup:
# pytest 9 ignores the node ids xdist 3.8 rewrites for it.
TEST_WORKERS ?= 2

.PHONY: install model serve serve-dp test gpu-check clean

install:
	@VENV=$(VENV) bash scripts/install.sh $(ROUTE)

model: install
	@$(PY) -m sglang_vase.models $(MODEL)

serve: model
	@echo "sglang-vase on http://127.0.0.1:$(PORT)  (try: curl http://127.0.0.1:$(PORT)/generate -H 'Content-Type: application/json' -d '{\"text\": \"Hello\", \"sampling_params\": {\"max_new_tokens\": 32}}')"
	$(PY) -m sglang_vase.launch_server --host 127.0.0.1 --port $(PORT) $(if $(MODEL),--model-path $(MODEL)) $(ARGS)

# Two data-parallel replicas (schedulers) behind one endpoint; on CPU each gets half the cores.
serve-dp: model
	$(PY) -m sglang_vase.launch_server --host 127.0.0.1 --port $(PORT) --dp-size 2 $(if $(MODEL),--model-path $(MODEL)) $(ARGS)

test: model
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# On a CUDA machine: kernel parity at Qwen3 shapes + kernel benchmark -> benchmarks/results/gpu_check.json
gpu-check: install
	PYTHON=$(PY) bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info
