#!/usr/bin/env bash
# Regenerate every golden fixture in tests/fixtures from the PyTorch reference.
#   tools/make_fixtures.sh            (REF_PYTHON=path/to/ref-venv/bin/python to reuse one)
# Each tools/fixtures_*.py builds the reference module with our tiny dimensions, loads our
# deterministic random weights strictly, injects the randomness, and writes small .npz
# files. The default test suite then compares against them without torch.
set -euo pipefail
cd "$(dirname "$0")/.."
OUR_PYTHON="${NIGHTINGALE_PYTHON:-.venv/bin/python}"
if [ -z "${REF_PYTHON:-}" ]; then
    tools/make_reference_env.sh .ref-venv
    REF_PYTHON=.ref-venv/bin/python
fi
export OMP_NUM_THREADS=1 NIGHTINGALE_PYTHON="$OUR_PYTHON"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

"$REF_PYTHON" tools/fixtures_t3.py                          # T3, punc_norm, tokenizer
"$REF_PYTHON" tools/fixtures_flow.py                        # flow encoder, estimator, CFM, flow.inference
"$REF_PYTHON" tools/fixtures_hift.py                        # F0, SineGen, HiFT decode/inference, S3Gen mel, STFT
"$OUR_PYTHON" tools/fixtures_voice.py clip                  # spoken reference clip (espeak-ng)
"$OUR_PYTHON" tools/fixtures_voice.py weights "$work/voice"
"$REF_PYTHON" tools/fixtures_voice.py fixtures "$work/voice"  # VE, S3Tokenizer, CAMPPlus, conditionals
"$REF_PYTHON" tools/fixtures_turbo.py                       # Turbo: layout, tokenizer, GPT-2 T3, MeanFlow
"$REF_PYTHON" tools/fixtures_conds.py                       # conds.pt written by torch, and our writer read by torch
echo "fixtures written to tests/fixtures"
