# seedpipe: one-command setup, tests, lint. Everything installs into .venv from this repo's files.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Every pip call goes through constraints.txt: it pins torch==2.13.0 (the local CPU wheel) so no
# dependency's range can pull a CUDA build of torch.
PIP := $(PY) -m pip --disable-pip-version-check
PIP_INSTALL := $(PIP) install -c constraints.txt

# Test/CI environment (see PITFALLS.md): no hub look-ups, no wandb, Ray auth off on loopback.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE := disabled
export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-cluster lint format clean

setup: $(VENV)/.installed $(VENV)/.ops-warm

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, alone and exact, then the project; reruns only when the dependency files change.
$(VENV)/.installed: $(PY) pyproject.toml constraints.txt
	$(PIP_INSTALL) -q torch==2.13.0
	$(PIP_INSTALL) -q -e '.[dev]'
	@touch $@

# DeepSpeed JIT-compiles its CPU comm op at first use (40-80 s, and a stale lock hangs later
# builds): build it once here, serially, into the venv-private TORCH_EXTENSIONS_DIR.
$(VENV)/.ops-warm: $(VENV)/.installed
	$(PY) -m jobs.deepspeed_ops --warm
	@touch $@

# The whole pipeline on a synthetic corpus: local Ray, embedded MLflow under ./seed-demo, no GPU,
# no internet (jobs/demo.py). A second run reuses what is up to date. DEMO_ARGS="--fresh" restarts.
demo: setup
	$(VENV)/bin/seedpipe demo $(DEMO_ARGS)

# Two pytest workers (pytest-xdist): a test spends much of its time in serial start-up (imports,
# Ray, servers) that leaves a core idle, so two share 2 cores well: the whole suite took 1,949 s in
# one process and 892 s in two on the same machine. Every test that uses the session's README
# chain runs on one worker (tests/conftest.py), so it is still built once. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadgroup)

# The cluster-user suites (marker `cluster`: 3-node Ray clusters with S3 and MLflow servers, and the
# demo on S3; 654 + 474 + 534 s when each ran alone here) are not in `make test`: with them CI
# passed its 90-minute limit. `make test-cluster` runs them.
test: setup
	$(PY) -m pytest -m "not cluster" $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# The cluster-user suites alone (tests/test_multinode.py, test_node_loss.py, test_demo_object_store.py).
test-cluster: setup
	$(PY) -m pytest -m cluster $(PYTEST_PARALLEL) $(PYTEST_ARGS)

# Everything not marked `slow` (pyproject.toml): skips the end-to-end Ray, DeepSpeed and server tests.
test-fast: setup
	$(PY) -m pytest -m "not slow and not cluster" $(PYTEST_PARALLEL) $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy seed_core

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
