#!/usr/bin/env bash
# The kernel checks that need a GPU, in one call (issue 20): the Triton kernel tests compiled for the GPU (no
# interpreter) and `tokenreduce bench --kernels` with its Triton column.
#
# Run from anywhere on a CUDA machine, with a Python environment that has a CUDA torch, triton and the project
# (`pip install -e ".[dev,video,triton]"`; PYTHON selects the interpreter, default python3):
#     bash scripts/gpu_kernels.sh            # tests, then the benchmark at the issue's scales
#     OUT=/some/dir bash scripts/gpu_kernels.sh
# Writes $OUT/kernel-tests.txt, $OUT/kernels-gpu.json and $OUT/kernels-gpu.txt (OUT defaults to bench-results).
# Exit status: the tests' status if they fail, else the benchmark's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench-results}
mkdir -p "$OUT"
export TRITON_INTERPRET=0  # compiled kernels: tests/conftest.py only turns the interpreter on when this is unset

"$PYTHON" - <<'PY'
import sys

import torch

try:
    import triton
except ImportError:
    sys.exit("gpu_kernels.sh: triton is not installed: pip install -e '.[triton]'")
if not torch.cuda.is_available():
    sys.exit("gpu_kernels.sh: no CUDA device: this script is for a GPU machine (CPU runs use the interpreter)")
print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name(0)}")
PY

# every kernel against its torch reference and the reducers on both backends, on CUDA tensors
"$PYTHON" -m pytest -q -m triton tests/test_kernels_triton.py tests/test_reducer_backends.py \
    2>&1 | tee "$OUT/kernel-tests.txt"
# the references' own tests (direct computations, errors, the 16k memory check) on this machine too
"$PYTHON" -m pytest -q tests/test_kernels.py 2>&1 | tee -a "$OUT/kernel-tests.txt"

# time and peak memory: naive torch vs torch reference vs Triton, at image and video scale
"$PYTHON" -m tokenreduce.cli bench --kernels --repeats 5 --warmup 2 --out "$OUT/kernels-gpu.json" \
    | tee "$OUT/kernels-gpu.txt"
