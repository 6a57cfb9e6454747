#!/usr/bin/env bash
# scripts/gpu-check.sh [OUT]: the checks that need an NVIDIA GPU, as one short run (about 5 minutes on
# an H100), printing what it measured; figures also go to OUT (default: $OUT, else ./gpu-check).
#   1. the engine on CUDA in bfloat16 and float32: the demo (full prefill vs blending, same question)
#   2. the Triton RoPE kernel against the reference, both dtypes
#   3. `ragcache bench serve` on CUDA, blend and full, closed loop at 1 and 8
#   4. the vLLM path, when a CUDA build of vLLM is installed in $VLLM_ENV (vLLM and ragcache's connector:
#      two servers on one Redis, a prompt computed on the first, loaded by the second); otherwise says so
# Run from the repository root after the README's install command. CI runs none of this: no GPU there.
set -uo pipefail
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
py=python
status=0
step() { echo; echo "== $*"; }
check() { "$@" || { echo "FAILED ($?): $*"; status=1; }; }

step "device"
check nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
check $py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

for dtype in bfloat16 float32; do
    step "demo on cuda, $dtype"
    check $py -m ragcache.cli demo --device cuda --dtype "$dtype"
done

step "Triton RoPE kernel vs reference"
check $py - <<'EOF'
import torch
from ragcache.kernels.rope import apply_rope, apply_rope_reference
for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
    x = torch.randn(30, 3, 4096, 64, device="cuda", dtype=dtype)
    angles = torch.randn(4096, 32, device="cuda")
    cos, sin = (torch.cat([f(angles)] * 2, -1).to(dtype) for f in (torch.cos, torch.sin))
    err = (apply_rope(x, cos, sin).float() - apply_rope_reference(x, cos, sin).float()).abs().max().item()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(); [apply_rope(x, cos, sin) for _ in range(20)]; end.record(); torch.cuda.synchronize()
    print(f"{dtype}: max error {err:.2e} (tol {tol:g}), {start.elapsed_time(end) / 20:.3f} ms per call")
    assert err <= tol, err
EOF

step "bench serve on cuda"
check $py -m ragcache.cli bench serve ../shared/data/musique_dev.json --limit 16 --device cuda --dtype bfloat16 \
    --modes full,blend@0.15 --concurrency 1,8 --rates "" --max-tokens 32 --peer none --json "$out/bench-serve-cuda.json"

step "vLLM on cuda"
if [ -n "${VLLM_ENV:-}" ] && "$VLLM_ENV/bin/python" -c "import vllm, torch; assert torch.cuda.is_available()" 2>/dev/null; then
    model="$out/model"
    check $py -m ragcache.cli export-model "$model" --dtype bfloat16
    redis-server --port 6390 --save "" --daemonize yes
    for port in 8101 8102; do
        VLLM_EAGER=0 scripts/vllm-serve.sh "$VLLM_ENV" "$model" $port redis://127.0.0.1:6390 > "$out/vllm-$port.log" 2>&1 &
    done
    for port in 8101 8102; do
        for _ in $(seq 1 120); do curl -sf "localhost:$port/health" > /dev/null && break; sleep 2; done
    done
    check $py -m ragcache.cli bench rag ../shared/data/musique_dev.json --limit 8 --docs 6 --kinds cold,repeat,cross_replica \
        --engine vllm --vllm-url http://127.0.0.1:8101,http://127.0.0.1:8102 --model "$model" --json "$out/bench-rag-vllm-cuda.json"
    pkill -f "vllm.entrypoints" || true
    redis-cli -p 6390 shutdown nosave || true
else
    echo "skipped: no CUDA build of vLLM at \$VLLM_ENV (the device machine cannot download one; give VLLM_ENV=DIR)"
fi
exit $status
