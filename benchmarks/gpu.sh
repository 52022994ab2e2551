#!/usr/bin/env bash
# Issue 18 on one CUDA GPU (sized for an H200), in one command: every figure as JSON in one folder.
#
#   bash benchmarks/gpu.sh OUT_DIR           # on a machine with a CUDA GPU (default results/gpu)
#   bash benchmarks/gpu.sh --smoke /tmp/g    # the same steps on the CPU at toy sizes, in seconds
#   PYTHON=/path/to/venv/bin/python bash benchmarks/gpu.sh OUT   # an interpreter not on PATH
#
# It runs $PYTHON, else the first python3 on PATH (an activated venv or conda env puts its own
# first); the tests pass the interpreter that runs them.
#
# Steps, each under its own time limit (seconds), each writing one file:
#   env.json                   torch / transformers / device, bf16 products with float32 output?
#   pytest.xml       (180)     the CUDA tests: pytest tests/test_{blocked,compressor,baselines}.py -k cuda,
#                              and tests/test_models_masks.py -k cuda (flash_attention_2/3, the
#                              kernels-hub flash-attn and flex_attention give sdpa's greedy tokens
#                              where the numerics allow: one prompt, a padded batch, a session)
#   compressor-bfloat16.json (150)  32 x 196 x 3584 bf16: every combination vs the dense reference
#                              and the blocked path, the registered baselines side by side
#   efficiency-sdpa.json (270) benchmarks/efficiency.py --size 7b (Table 6: vision, process,
#                              prefill, TTFT, throughput, peak memory; 100/10/5/2/1 %, +- merging)
#   efficiency-flash.json      the same with flash_attention_2, only where flash_attn imports
#   compressor-scaling.json (150)   32 -> 256 frames, bf16: time and max_memory_allocated
#   compressor-float32.json (120)   32 x 196 x 3584 float32: every combination
#   gpu.log                    everything printed
# Needs a CUDA build of torch, ustc's dependencies, pytest and hypothesis; loads no weights (the
# 7B architecture is randomly initialised).  Offline machines: benchmarks/gpu-wheels.txt.
set -uo pipefail

smoke=0
if [ "${1:-}" = "--smoke" ]; then
    smoke=1
    shift
fi
out="${1:-${OUT:-results/gpu}}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then  # wheels put there for an offline machine
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
log="$out/gpu.log"
: >"$log"
start=$SECONDS
failed=()

step() {  # step NAME LIMIT COMMAND...: run it under `timeout`, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    # the limits fit the H200's budget; a smoke run on a shared CPU may take ten times longer
    [ "$smoke" -eq 1 ] && limit=$((limit * 10))
    echo "== $name (limit ${limit}s, at $((SECONDS - start))s): $*" | tee -a "$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc after $((SECONDS - start))s" | tee -a "$log"
    [ "$rc" -eq 0 ] || failed+=("$name (rc $rc)")
}

if [ "$smoke" -eq 1 ]; then
    device=cpu
    bench=(--device cpu --smoke)
    scaling=(--scaling 2 4 --blocked)
    table=(--size small --device cpu --frames 2 --repeats 1 --new-tokens 2 --retentions 0.1)
else
    device=cuda
    bench=(--device cuda --repeats 20 --no-loop)
    scaling=(--scaling 32 64 128 256 --repeats 6)
    table=(--size 7b --device cuda --repeats 3 --retentions 0.1 0.05 0.02 0.01)
fi

step env 60 "$py" - "$out/env.json" "$device" <<'EOF'
import json, sys, torch, transformers
from ustc.blocked import uses_low_precision_products
path, device = sys.argv[1], sys.argv[2]
probe = torch.zeros(1, dtype=torch.bfloat16, device=device)
try:
    import flash_attn  # noqa: F401
    flash = flash_attn.__version__
except ImportError:
    flash = None
env = {
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "cuda": torch.version.cuda,
    "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
    "bf16_products_with_float32_output": uses_low_precision_products(probe),
    "flash_attn": flash,
}
open(path, "w").write(json.dumps(env, indent=2))
print(json.dumps(env))
EOF

step pytest 180 "$py" -m pytest tests/test_blocked.py tests/test_compressor.py \
    tests/test_baselines.py tests/test_models_masks.py -k cuda -q -p no:cacheprovider -rs --continue-on-collection-errors \
    --junitxml="$out/pytest.xml"
step compressor-bfloat16 150 "$py" benchmarks/compressor.py "${bench[@]}" --dtype bfloat16 \
    --data structured scenes --sections combinations baselines \
    --output "$out/compressor-bfloat16.json"
step efficiency-sdpa 270 "$py" benchmarks/efficiency.py "${table[@]}" --attn sdpa \
    --output "$out/efficiency-sdpa.json"
if "$py" -c "import flash_attn" 2>/dev/null; then
    step efficiency-flash 240 "$py" benchmarks/efficiency.py "${table[@]}" \
        --attn flash_attention_2 --output "$out/efficiency-flash.json"
else
    echo "== efficiency-flash: skipped, flash_attn is not installed" | tee -a "$log"
fi
step compressor-scaling 150 "$py" benchmarks/compressor.py "${bench[@]}" --dtype bfloat16 \
    --sections scaling "${scaling[@]}" --output "$out/compressor-scaling.json"
step compressor-float32 120 "$py" benchmarks/compressor.py "${bench[@]}" --dtype float32 \
    --sections combinations --output "$out/compressor-float32.json"

echo "== done in $((SECONDS - start))s; failed: ${failed[*]:-none}" | tee -a "$log"
[ "${#failed[@]}" -eq 0 ]
