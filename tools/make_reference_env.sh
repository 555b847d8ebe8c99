#!/usr/bin/env bash
# Build the PyTorch reference (chatterbox-tts 0.1.7, CPU torch) in its own virtual
# environment. It is a tool for parity fixtures and baseline benchmarks, never a runtime
# dependency. Why each step: the comments beside it. About 1.7 GB, 1.5 minutes.
#   tools/make_reference_env.sh [VENV_DIR]      (default: .ref-venv)
set -euo pipefail
venv="${1:-.ref-venv}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import chatterbox, perth" 2>/dev/null; then
    echo "reference environment ready: $venv"; exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q torch==2.13.0                  # CPU build
"$venv/bin/pip" install -q --no-deps torchaudio==2.11.0   # its wheel links CUDA libraries ...
rm -f "$venv"/lib/python3*/site-packages/torchaudio/lib/*.so   # ... the parts chatterbox uses work without them
"$venv/bin/pip" install -q 'numpy<2' transformers==5.2.0 diffusers==0.29.0 librosa==0.11.0 conformer==0.3.2 \
    safetensors==0.5.3 omegaconf einops onnx pyloudnorm tqdm scipy soundfile 'setuptools<81'
"$venv/bin/pip" install -q --no-deps s3tokenizer==0.3.0 resemble-perth==1.0.1 chatterbox-tts==0.1.7
"$venv/bin/python" -c "import chatterbox, perth; assert perth.PerthImplicitWatermarker is not None"
echo "reference environment ready: $venv"
