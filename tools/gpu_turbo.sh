#!/usr/bin/env bash
# Issue 15's run on a lent NVIDIA GPU (the device tool), MLX's CUDA backend, from the repository
# root. Prepared here, never committed (both folders are ignored):
#   .gpu/a: part00 of the mlx-cuda-13 wheel, ref/ the transformers wheel
#   .gpu/b: part01, the mlx wheel, ref/ the other wheels of the reference's T3 (regex, einops,
#           tokenizers and huggingface_hub at the versions transformers 5.2 wants) and
#           chatterbox-tts 0.1.7
# (recipe for the mlx parts in the project's GPU notes; `pip download --only-binary=:all:
# --python-version 3.12 --platform manylinux_2_17_x86_64 ...` for the rest).
#   call 1 (carry .gpu/a):  bash tools/gpu_turbo.sh stage
#   call 2 (carry .gpu/b):  bash tools/gpu_turbo.sh daemon     # request-to-first-audio p50s
#   call 3 (no carry):      bash tools/gpu_turbo.sh bench      # bench/turbo.py, reference T3 on CUDA
#   or, for a before/after of models/streaming.py (its old copy in .gpu/c/streaming_before.py):
#   call 2 (carry .gpu/b .gpu/c):  bash tools/gpu_turbo.sh pump   # Turbo daemon p50, old and new, interleaved
# Calls must follow each other within the machine's idle release. Full random checkpoints are
# generated on the device; every result is written under $OUT as soon as it exists.
set -uo pipefail
step="${1:-daemon}"
S=/tmp/site; R=/tmp/refsite; OUT="${OUT:-/tmp/out}"; REPO=$(pwd)
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
W=/tmp/gpu/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
TURBO=/tmp/turbo-full; ORIG=/tmp/ckpt-full
mkdir -p "$OUT"
if [ "$step" = stage ]; then
    mkdir -p /tmp/gpu && cp .gpu/a/part00 /tmp/gpu/ && rm -rf /tmp/gpu/ref && cp -r .gpu/a/ref /tmp/gpu/ref
    python3 --version
    python3 -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|tokenizers|huggingface.hub|safetensors|numpy|anyio|msgpack|soundfile|soxr|platformdirs|tqdm|pyyaml|regex|einops|sounddevice|pyloudnorm|scipy|setuptools) "
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; exit 0
fi
if [ ! -d "$S/mlx" ]; then
    cat /tmp/gpu/part00 .gpu/b/part01 > "$W"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" .gpu/b/mlx-0.32.4-*.whl "$W" || exit 1
    ln -sfn "$NV" "$S/nvidia"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$R" /tmp/gpu/ref/*.whl .gpu/b/ref/*.whl \
        || echo "reference install failed"
fi
export PYTHONPATH=$S LD_LIBRARY_PATH=$(ls -d $NV/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
export NIGHTINGALE_NO_OPENBLAS=1 NIGHTINGALE_CACHE_DIR=/tmp/ngcache PYTHONUNBUFFERED=1
if [ "$step" = daemon ] || [ "$step" = pump ]; then
    python3 -m pip install -q --no-index --no-deps --target "$S" .gpu/c/*.whl
    python3 -m pip install -q --no-deps --no-build-isolation --target "$S" . >/dev/null 2>&1 || \
        python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target "$S" .
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    MODELS="$TURBO"; [ "$step" = daemon ] && MODELS="$TURBO $ORIG"
    (cd /tmp && python3 -m nightingale.cli dev make-checkpoint $TURBO --family turbo --size full) &
    [ "$step" = daemon ] && (cd /tmp && python3 -m nightingale.cli dev make-checkpoint $ORIG --size full) &
    wait
    # Convert (and quantize) each model once before timing; a conversion that dies is retried
    # once (an intermittent CUDA abort was seen on the first conversion in an earlier session).
    for m in $MODELS; do
        for attempt in 1 2; do
            (cd /tmp && python3 -c "import sys; from nightingale.models import load_model; load_model(sys.argv[1], quantize=8)" "$m") \
                >>"$OUT/convert.log" 2>&1 && break
            echo "conversion of $m failed (attempt $attempt), rc=$?" | tee -a "$OUT/convert.log"
        done
    done
    D="python3 $REPO/bench/daemon.py --clients 1 --utterances ${DAEMON_N:-30} --warmup 5"
fi
if [ "$step" = pump ]; then
    O=/tmp/oldsite; rm -rf $O && mkdir -p $O && cp -r $S/nightingale $O/ && cp .gpu/c/streaming_before.py $O/nightingale/models/streaming.py
    for round in 1 2; do
        (cd /tmp && PYTHONPATH=$O:$S timeout 200 $D --model $TURBO --options '{"max_new_tokens": 40}') 2>&1 | tee "$OUT/pump-before-$round.md" | grep -E "first audio|RTF|errors"
        (cd /tmp && timeout 120 $D --model $TURBO --options '{"max_new_tokens": 40}') 2>&1 | tee "$OUT/pump-after-$round.md" | grep -E "first audio|RTF|errors"
    done
fi
if [ "$step" = daemon ]; then
    (cd /tmp && timeout 170 $D --model $TURBO --options '{"max_new_tokens": 40}') 2>&1 | tee "$OUT/daemon-turbo.md"
    (cd /tmp && timeout 150 $D --model $ORIG --options '{"max_new_tokens": 40}') 2>&1 | tee "$OUT/daemon-original.md"
    (cd /tmp && timeout 150 $D --model $ORIG --decoder $TURBO --options '{"max_new_tokens": 40}') 2>&1 | tee "$OUT/daemon-paired.md"
    # What a smaller first chunk buys Turbo (12 tokens: 4 tokens of audio before HiFT's holdback)
    (cd /tmp && timeout 120 $D --model $TURBO --options '{"max_new_tokens": 40, "chunk_schedule": "12,2,48"}') 2>&1 \
        | tee "$OUT/daemon-turbo-first12.md"
fi
if [ "$step" = bench ]; then
    # the reference alone on its path: our site's soundfile (no cffi there) would break transformers' import
    printf '#!/bin/sh\nPYTHONPATH=%s exec python3 "$@"\n' "$R" > /tmp/refpy && chmod +x /tmp/refpy
    python3 bench/turbo.py --turbo $TURBO --original $ORIG --runs "${RUNS:-turbo:int8,turbo:float16,paired:int8,original:int8}" \
        --reference --reference-device cuda --reference-python /tmp/refpy --tokens 100 --out "$OUT/turbo" 2>&1 | tee "$OUT/turbo.log"
fi
