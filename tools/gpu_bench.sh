#!/usr/bin/env bash
# Benchmarks on a lent NVIDIA GPU (the device tool), MLX's CUDA backend.
# Recipe: shared/notes/gpu.md. The 90 MB mlx-cuda wheel travels in two parts (.gpu/a, .gpu/b,
# prepared here once, never committed); a full random checkpoint is generated on the device.
#   call 1 (carry .gpu/a):        bash tools/gpu_bench.sh stage
#   call 2 (carry .gpu/b .whl):   bash tools/gpu_bench.sh run [precision|stream|all]
set -euo pipefail
step="${1:-run}"; what="${2:-all}"
S=/tmp/site; CKPT=/tmp/ckpt-full; OUT="${OUT:-/tmp/out}"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
W=/tmp/gpu/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
if [ "$step" = stage ]; then
    mkdir -p /tmp/gpu && cp .gpu/a/part00 /tmp/gpu/ && ls -la /tmp/gpu; exit 0
fi
if [ ! -d "$S/mlx" ]; then
    cat /tmp/gpu/part00 .gpu/b/part01 > "$W"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" .gpu/b/mlx-0.32.4-*.whl "$W" .whl/*.whl
    ln -sfn "$NV" "$S/nvidia"
fi
export PYTHONPATH=$S LD_LIBRARY_PATH=$(ls -d $NV/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
export NIGHTINGALE_NO_OPENBLAS=1 NIGHTINGALE_CACHE_DIR=/tmp/ngcache PYTHONUNBUFFERED=1
# the project builds with the device's own setuptools (needs >= 77; no network there)
python3 -m pip install -q --no-deps --no-build-isolation --target "$S" . >/dev/null 2>&1 || \
    python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target "$S" .
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.ones(4).sum())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# (from /tmp: the repository's own nightingale/ folder would shadow the installed package)
[ -f $CKPT/dims.json ] || (cd /tmp && python3 -m nightingale.cli dev make-checkpoint $CKPT --size full --seed 0)
mkdir -p "$OUT"
if [ "$what" = precision ] || [ "$what" = all ]; then
    python3 bench/precision.py --model $CKPT --cache /tmp/bench-cache ${PRECISION_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/precision.log"
fi
if [ "$what" = stream ] || [ "$what" = all ]; then
    python3 bench/stream.py --model $CKPT --configs "${STREAM_CONFIGS:-int8;float16}" ${STREAM_ARGS:-} --out "$OUT" 2>&1 | tee "$OUT/stream.log"
fi
