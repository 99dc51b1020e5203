#!/usr/bin/env bash
# Creates benchmarks/peers/.venv-peers with anomalib's FastFlow and its runtimes (issue 6 peers benchmark).
# About 6.5 GB: the torch 2.14.1 wheel on our package mirror is the CUDA (cu130) build; it runs on the CPU.
# Needs Python 3.11 (the mirror's torch wheels are cp311). Pins are the versions the recorded run used.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv "$here/.venv-peers"
pip="$here/.venv-peers/bin/pip"
"$pip" install torch==2.14.1 torchvision==0.29.1
"$pip" install anomalib==2.7.0 openvino==2026.4.1 onnx==1.23.2 onnxruntime==1.32.0 timm==1.0.31 freia==0.2
