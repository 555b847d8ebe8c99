#!/usr/bin/env bash
# Turbo benchmarks on a lent NVIDIA GPU (the device tool), MLX's CUDA backend; recipe in
# shared/notes/gpu.md and tools/gpu_bench.sh. The device sends the main checkout, so this tree
# travels as an ignored copy (.turbo) beside the wheel parts:
#   call 1 (carry .gpu/a):          bash .turbo/tools/gpu_turbo.sh stage
#   call 2 (carry .gpu/b .turbo):   bash .turbo/tools/gpu_turbo.sh run
# Full random checkpoints (Turbo and original) are generated on the device; every result is
# written under $OUT as soon as it exists.
set -uo pipefail
step="${1:-run}"
S=/tmp/site; OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
W=/tmp/gpu/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
if [ "$step" = stage ]; then
    mkdir -p /tmp/gpu && cp .gpu/a/part00 /tmp/gpu/ && ls -la /tmp/gpu; exit 0
fi
if [ ! -d "$S/mlx" ]; then
    cat /tmp/gpu/part00 .gpu/b/part01 > "$W"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" .gpu/b/mlx-0.32.4-*.whl "$W" || exit 1
    ln -sfn "$NV" "$S/nvidia"
fi
export PYTHONPATH=$S LD_LIBRARY_PATH=$(ls -d $NV/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
export NIGHTINGALE_NO_OPENBLAS=1 NIGHTINGALE_CACHE_DIR=/tmp/ngcache PYTHONUNBUFFERED=1
cd .turbo
python3 -m pip install -q --no-deps --no-build-isolation --target "$S" . >/dev/null 2>&1 || \
    python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target "$S" .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
(cd /tmp && python3 -m nightingale.cli dev make-checkpoint /tmp/turbo-full --family turbo --size full) &
(cd /tmp && python3 -m nightingale.cli dev make-checkpoint /tmp/ckpt-full --size full) &
wait
B="python3 bench/turbo.py --turbo /tmp/turbo-full --original /tmp/ckpt-full ${TURBO_ARGS:-}"
$B --runs "${RUNS_A:-turbo:int8,paired:int8}" --out "$OUT/a" 2>&1 | tee "$OUT/turbo_a.log"
timeout "${DAEMON_TIMEOUT:-100}" python3 bench/daemon.py --model /tmp/turbo-full --clients 1 --utterances 20 --warmup 3 \
    --options '{"max_new_tokens": 40}' 2>&1 | tee "$OUT/daemon.log"
$B --runs "${RUNS_B:-turbo:float16,original:int8}" --out "$OUT/b" 2>&1 | tee "$OUT/turbo_b.log"
