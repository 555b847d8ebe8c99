#!/usr/bin/env bash
# Issue 11's H100 run (device tool): S3Gen call profile, T3 against the reference on the same
# GPU, streaming and daemon latency, each also for the code before the change (.gpu/old).
# Prepared here, never committed: .gpu/a (mlx-cuda part 1), .gpu/b (part 2 + mlx), .gpu/tf
# (transformers wheel), .gpu/old (`git archive` of the old tree), .whl (runtime wheels the
# device lacks; .whl/ref: the reference's T3 and its imports). See shared/notes/gpu.md.
#   call 1 (carry .gpu/a .gpu/tf .gpu/old):  bash tools/gpu_stream.sh stage
#   call 2.. (carry .gpu/b .whl):           bash tools/gpu_stream.sh run "cfm t3 stream daemon"
set -uo pipefail
step="${1:-run}"; what="${2:-cfm t3 stream daemon}"
S=/tmp/site; R=/tmp/refsite; O=/tmp/oldsite; CKPT=/tmp/ckpt-full; OUT="${OUT:-/tmp/out}"; REPO=$(pwd)
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
W=/tmp/gpu/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
if [ "$step" = stage ]; then
    mkdir -p /tmp/gpu && cp .gpu/a/part00 .gpu/tf/*.whl /tmp/gpu/ && rm -rf /tmp/gpu/old && cp -r .gpu/old /tmp/gpu/old
    python3 -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|tokenizers|huggingface.hub|safetensors|numpy|httpx|anyio|msgpack|cffi|soundfile|platformdirs|setuptools|tqdm|pyyaml|regex) "
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; exit 0
fi
if [ ! -d "$S/mlx" ]; then
    cat /tmp/gpu/part00 .gpu/b/part01 > "$W"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$S" .gpu/b/mlx-0.32.4-*.whl "$W" .whl/*.whl
    ln -sfn "$NV" "$S/nvidia"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$R" .whl/ref/*.whl /tmp/gpu/transformers-*.whl
fi
export PYTHONPATH=$S:$R LD_LIBRARY_PATH=$(ls -d $NV/*/lib | tr '\n' ':')${LD_LIBRARY_PATH:-}
export NIGHTINGALE_NO_OPENBLAS=1 NIGHTINGALE_CACHE_DIR=/tmp/ngcache PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target "$S" . >/dev/null 2>&1 || echo "project install failed"
[ -d "$O/nightingale" ] || python3 -m pip install -q --no-deps --no-build-isolation --target "$O" /tmp/gpu/old >/dev/null 2>&1 \
    || echo "old install failed"
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.ones(4).sum())"
[ -f $CKPT/dims.json ] || (cd /tmp && python3 -m nightingale.cli dev make-checkpoint $CKPT --size full --seed 0)
mkdir -p "$OUT"
old() {  # the code before issue 11, with its own conversion cache
    (cd /tmp && PYTHONPATH=$O:$S:$R NIGHTINGALE_CACHE_DIR=/tmp/ngcache-old "$@")
}
DOPTS='{"max_new_tokens": 75}'; [ -n "${DAEMON_OPTIONS:-}" ] && DOPTS=$DAEMON_OPTIONS
for w in $what; do
  case $w in
    cfm) python3 bench/cfm.py --model $CKPT --quantize 8 --out "$OUT" 2>&1 | tail -20 ;;
    t3)
      python3 bench/t3.py $CKPT --reference-python python3 --reference-device cuda --dtypes float16 --bits 8 \
          --tokens ${T3_TOKENS:-100} 2>&1 | tee "$OUT/t3.md" | tail -8
      old python3 /tmp/gpu/old/bench/t3.py $CKPT --no-reference --dtypes float16 --bits 8 --tokens ${T3_TOKENS:-100} \
          2>&1 | tee "$OUT/t3-old.md" | tail -4 ;;
    stream)
      python3 bench/stream.py --model $CKPT --configs "${STREAM_CONFIGS:-default}" ${STREAM_ARGS:-} --timeline --out "$OUT" \
          2>&1 | tee "$OUT/stream.log" | grep -v "^  " ;;
    oldstream)
      old python3 /tmp/gpu/old/bench/stream.py --model $CKPT --configs "${OLD_CONFIGS:-int8}" --skip-deviation 2>&1 \
          | tee "$OUT/stream-old.log" | tail -5 ;;
    daemon)  # new code once per options set in DAEMON_RUNS (';'-separated JSON), then the old code
      IFS=';' read -ra runs <<< "${DAEMON_RUNS:-$DOPTS}"
      n=0; for o in "${runs[@]}"; do n=$((n+1))
        (cd /tmp && python3 $REPO/bench/daemon.py --model $CKPT --clients 1 --utterances ${DAEMON_N:-20} --warmup 4 \
            --options "$o" 2>&1 | tee "$OUT/daemon$n.md" | grep -E "first audio|TTFA|RTF|errors|options:")
      done
      old python3 /tmp/gpu/old/bench/daemon.py --model $CKPT --clients 1 --utterances ${DAEMON_N:-20} --warmup 4 \
          --options "$DOPTS" 2>&1 | tee "$OUT/daemon-old.md" | grep -E "first audio|TTFA|RTF|errors|options:" ;;
  esac
done
