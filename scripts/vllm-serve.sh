#!/usr/bin/env bash
# scripts/vllm-serve.sh ENV MODEL PORT [REDIS_URL] [-- VLLM_ARGS...]: one vLLM OpenAI server from the
# environment scripts/vllm-cpu-env.sh made at ENV, serving MODEL (a safetensors folder: `ragcache
# export-model DIR`) on 127.0.0.1:PORT under the name "ragcache-default", with automatic prefix caching
# and, when REDIS_URL is given, ragcache's KV connector saving and loading prefix blocks through it.
#
# Defaults for this CPU build, each overridable from the environment: VLLM_CPU_KVCACHE_SPACE=2 (GiB of
# KV), VLLM_DTYPE=bfloat16, VLLM_MAX_MODEL_LEN=8192, VLLM_EAGER=1 (--enforce-eager: start-up in about a
# minute instead of four, for torch.compile's graphs; 0 compiles them).
# On a GPU the same command line works with a CUDA build of vLLM in ENV (deploy/k8s/vllm has the Deployment).
set -euo pipefail
env_dir="${1:?usage: scripts/vllm-serve.sh ENV MODEL PORT [REDIS_URL] [-- VLLM_ARGS...]}"
model="${2:?model folder}"
port="${3:?port}"
shift 3
redis_url=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then redis_url="$1"; shift; fi
if [ "${1:-}" = "--" ]; then shift; fi

args=(--model "$model" --served-model-name ragcache-default --host 127.0.0.1 --port "$port"
      --dtype "${VLLM_DTYPE:-bfloat16}" --max-model-len "${VLLM_MAX_MODEL_LEN:-8192}" --enable-prefix-caching
      --enable-prompt-tokens-details)
if [ "${VLLM_EAGER:-1}" = "1" ]; then args+=(--enforce-eager); fi
if [ -n "$redis_url" ]; then
    args+=(--kv-transfer-config "{\"kv_connector\":\"RagcacheConnector\",\"kv_connector_module_path\":\"ragcache.vllm.connector\",\"kv_role\":\"kv_both\",\"kv_load_failure_policy\":\"recompute\",\"kv_connector_extra_config\":{\"redis_url\":\"$redis_url\"}}")
fi
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
exec "$env_dir/bin/python" -m vllm.entrypoints.openai.api_server "${args[@]}" "$@"
