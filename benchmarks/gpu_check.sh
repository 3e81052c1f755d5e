#!/usr/bin/env bash
# The GPU check in one command, for a GPU machine that has a copy of this working tree and no network:
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options, e.g. --model-dir /models/Qwen2.5-0.5B-Instruct]
#
# Installs nothing. It prints the GPU (nvidia-smi), then runs benchmarks/gpu_check.py from this checkout (on PYTHONPATH
# when trl-rewardweighted is not installed), which starts with what is installed (torch and its CUDA build,
# transformers, trl, accelerate, deepspeed, peft, the SmolLM2 wheel, ...) and names each missing package with the
# parts that need it (those parts are skipped). The JSON and the log go to $OUT when it is set (a folder that comes
# back from a remote machine), else to benchmarks/. Exit code: gpu_check.py's (0: every part that ran passed, or a dry
# run without a GPU whose checks passed).
set -u
cd "$(dirname "$0")/.." || exit 2
PYTHON=${PYTHON:-python3}
DEST=${OUT:-benchmarks}
mkdir -p "$DEST"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

echo "== GPU"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else
    echo "nvidia-smi: not found"
fi
command -v "$PYTHON" >/dev/null 2>&1 || { echo "gpu_check.sh: $PYTHON not found (set PYTHON=...)"; exit 2; }
echo "== benchmarks/gpu_check.py $*"
"$PYTHON" benchmarks/gpu_check.py --output "$DEST/gpu_check.json" "$@" 2>&1 | tee "$DEST/gpu_check.log"
exit "${PIPESTATUS[0]}"
