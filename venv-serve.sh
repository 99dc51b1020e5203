#!/usr/bin/env bash
# Makes .venv-serve, the environment of `python -m engine.serve` (docs/deploy.md): Triton's Python backend
# (in the nvidia-pytriton wheel) links against the system's Python 3.11, so the venv is made from it.
# The run side only: no torch (engines of the onnxruntime and openvino backends).  Usage: bash venv-serve.sh
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON311:-/usr/bin/python3.11}
[[ -x $PY ]] || { echo "error: $PY not found: Triton's Python backend needs the system's python3.11 (set PYTHON311)" >&2; exit 2; }
"$PY" -m venv .venv-serve
.venv-serve/bin/pip install -q "nvidia-pytriton>=0.5" "tritonclient[http,grpc]>=2.40" "numpy>=1.26" "pillow>=10.0" \
  "onnxruntime>=1.17" "openvino>=2024.0" "opencv-python-headless>=4.8"
.venv-serve/bin/pip install -q --no-deps -e .   # lineflow itself (compiles the native extension)
echo "made .venv-serve: .venv-serve/bin/python -m engine.serve model.engine"
