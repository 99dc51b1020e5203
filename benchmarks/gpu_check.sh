#!/usr/bin/env bash
# The GPU check of issue 20, in one run of under 5 minutes on a machine with an NVIDIA GPU.
#
#   here (CPU, once):  benchmarks/gpu_check.sh --prepare MODEL.pt
#       copies a trained default model (python -m train.fit --data ../shared/data/mtd --out MODEL.pt) and
#       24 real MTD test images into gpu-carry/ (in .gitignore; about 25 MB: within the device tool's carry limit)
#   there (GPU):       bash benchmarks/gpu_check.sh            (device tool: carry ["gpu-carry"])
#       builds the native extension in place, runs the compiled kernel tests and the TensorRT tests, then
#       benchmarks/gpu_check.py: the CUDA engine against the CPU engine on the real images, the speed table.
#       Needs no pip install and no network: the machine's own Python, PyTorch, Triton, pybind11, onnxruntime.
#       Writes its logs and gpu_check.json under $OUT (the device tool's output folder) or ./gpu-out.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=gpu-carry

if [[ ${1:-} == --prepare ]]; then
  model=${2:?usage: benchmarks/gpu_check.sh --prepare MODEL.pt (a trained default model)}
  mtd=${LINEFLOW_MTD:-../shared/data/mtd}
  [[ -f $model ]] || { echo "error: $model: no such model file" >&2; exit 2; }
  [[ -d $mtd/test ]] || { echo "error: $mtd/test: MTD is not there (set LINEFLOW_MTD)" >&2; exit 2; }
  rm -rf "$CARRY" && mkdir -p "$CARRY/mtd/test"
  cp "$model" "$CARRY/model.pt"
  for t in good blowhole break crack fray; do
    mkdir -p "$CARRY/mtd/test/$t"
    find "$mtd/test/$t" -maxdepth 1 -type f | sort | head -n "$([[ $t == good ]] && echo 8 || echo 4)" |
      xargs -I{} cp {} "$CARRY/mtd/test/$t/"
  done
  echo "prepared $CARRY: $(du -sh "$CARRY" | cut -f1), $(find "$CARRY/mtd" -type f | wc -l) images"
  exit 0
fi

[[ -f $CARRY/model.pt ]] || { echo "error: $CARRY/model.pt missing: run benchmarks/gpu_check.sh --prepare MODEL.pt here first" >&2; exit 2; }
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TQDM_DISABLE=1 LINEFLOW_MTD=$PWD/$CARRY/mtd
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
python3 -c "import tensorrt; print('TensorRT', tensorrt.__version__)" 2>/dev/null || echo "TensorRT absent: tests/test_tensorrt.py's static graph test stands in"
SECONDS=0
python3 setup.py -q build_ext --inplace >"$out/build_ext.log" 2>&1 || { tail -20 "$out/build_ext.log"; exit 1; }
echo "native extension built in ${SECONDS}s"
# compiled kernels against their references; the TensorRT graph test; the engine against the reference
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_tensorrt.py \
  2>&1 | tee "$out/tests.log" | tail -5 || echo "kernel/TensorRT tests failed or timed out: see $out/tests.log"
echo "tests done at ${SECONDS}s"
timeout 200 python3 -m benchmarks.gpu_check --model "$CARRY/model.pt" --images "$CARRY/mtd/test" \
  --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log" | grep -v "vs PyTorch reference\|^folded graph"
echo "gpu_check done at ${SECONDS}s"
# issue 47: what an epoch of train.fit costs on this GPU, fp32 and bf16, at BSD's and MTD's default inputs
for shape in "640x256 --train 518 --holdout 57" "256x256 --train 686 --holdout 76"; do
  # shellcheck disable=SC2086
  timeout 60 python3 -m benchmarks.train_breakdown --device cuda --input $shape 2>&1 | tee -a "$out/train_breakdown.log"
done
echo "train_breakdown done at ${SECONDS}s"
