#!/usr/bin/env bash
# slimconv's CUDA paths and its GPU measurements, for a machine with an NVIDIA GPU (CI has none, so the
# CUDA tests skip there). Two stages, each one command:
#
#   benchmarks/gpu_checks.sh tests   # the CUDA tests, and the heal and bench tests with torch seeing the GPU
#   benchmarks/gpu_checks.sh bench   # SmolLM2-135M on the GPU: the README's first command (docs/results/gpu-h200.md) (convert, validate,
#                                    # heal), heal of the two block recipes, SLEB's window trace at 32 x 256
#                                    # tokens, torch decode speed of source vs slim in float32 and bfloat16
#
# Logs and JSON go to GPU_OUT (default outputs/gpu). GPU_SECONDS (default 3600) is the time the whole stage
# may take: each step has its own limit, cut to what is left, so one slow step cannot eat the rest and the
# logs of the finished steps always remain.
set -u
stage=${1:?usage: benchmarks/gpu_checks.sh tests|bench}
out=${GPU_OUT:-outputs/gpu}
py=${PYTHON:-python3}
deadline=$(( $(date +%s) + ${GPU_SECONDS:-3600} ))
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {  # step NAME LIMIT_S COMMAND...: runs it under a limit, log in $out/NAME.log, prints its tail
    local name=$1 limit=$2 left start rc
    shift 2
    left=$(( deadline - $(date +%s) - 15 ))
    if (( left < 30 )); then echo "== $name: skipped, ${left}s left"; return; fi
    (( limit > left )) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(( $(date +%s) - start ))s"
    tail -n "${TAIL:-20}" "$out/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$out/gpu.txt"
$py - <<'EOF' | tee -a "$out/gpu.txt"
import onnxruntime, torch, transformers
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, sees the GPU: {torch.cuda.is_available()}), "
      f"transformers {transformers.__version__}, onnxruntime {onnxruntime.__version__} with "
      f"{onnxruntime.get_available_providers()}")
EOF

case $stage in
tests)
    step cuda-tests 400 $py -m pytest -q -p no:cacheprovider tests/test_exact_tiny.py tests/test_heal.py \
        tests/test_bench.py tests/test_analyse.py -k "cuda or heal or bench or sleb"
    ;;
bench)
    heal_flags=(--modes all --lr 3e-4 --data wikitext2+generated)
    step readme 300 $py -m slimconv run recipes/smollm2-drop-late-attention.yaml --force
    step heal-blocks 400 $py benchmarks/bench_heal.py --recipes drop-blocks-20pct,sleb-20pct "${heal_flags[@]}" \
        --steps 400 --minutes 5 --out-dir "$out/heal"
    step sleb-trace 240 $py benchmarks/sleb_windows.py --samples 32 --seq-len 256 --steps 9 --device cuda \
        --trace "$out/sleb_trace32.json"
    step convert-pairs 120 $py -m slimconv convert recipes/smollm2-parallel-pairs.yaml --force
    for slim in outputs/smollm2-drop-late-attention outputs/smollm2-drop-late-attention-healed \
                "$out/heal/drop-blocks-20pct" outputs/smollm2-parallel-pairs; do
        for dtype in float32 bfloat16; do
            step "speed-$(basename "$slim")-$dtype" 120 $py -m slimconv bench default "$slim" --runtime torch \
                --device cuda --torch-dtype "$dtype" --batch 1,16 --new-tokens 64 --repeats 5 \
                --out-json "$out/speed-$(basename "$slim")-$dtype.json"
        done
    done
    mkdir -p "$out/heal-long" && cp -r "$out/heal/drop-blocks-20pct" "$out/heal-long/"  # converted once
    step heal-blocks-long 400 $py benchmarks/bench_heal.py --recipes drop-blocks-20pct "${heal_flags[@]}" \
        --steps 2000 --minutes 5 --out-dir "$out/heal-long"
    ;;
*)
    echo "unknown stage $stage: tests or bench" >&2
    exit 2
    ;;
esac
