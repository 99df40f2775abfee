#!/usr/bin/env bash
# The one GPU check, sized for a few minutes on one card: build with CUDA, run the CUDA parity
# tests, then every GPU benchmark; the tables land in $OUT (or ./gpu-results) for RESULTS.md.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee "$out/device.txt"

# The card's machine reaches no package index but has torch, triton, pybind11, setuptools and
# pytest: build against what is there. CUDA C++ kernels where it has nvcc; Triton either way.
python -m pip install -q --no-build-isolation --no-deps . 2>&1 | tail -3
python -c "import vdm_fast; print(vdm_fast.build_info())" | tee -a "$out/device.txt"

# Parity first: a kernel that is wrong is not worth timing.
pytest -q -m cuda -p no:cacheprovider 2>&1 | tee "$out/cuda_tests.txt" | tail -5

python benchmarks/bench_loss.py --device cuda --ref-limit-gb 100 2>&1 | tee "$out/bench_loss.md" | tail -12
for impl in triton cuda; do
    python benchmarks/bench_schedule.py --device cuda --impl "$impl" 2>&1 | tee "$out/bench_schedule_$impl.md" | tail -8
done
VDM_FAST_CUDA_IMPL=cuda python benchmarks/bench_loss.py --device cuda --quick 2>&1 | tee "$out/bench_loss_cuda_cpp.md" | tail -6
python benchmarks/bench_train.py --device cuda --steps 10 2>&1 | tee "$out/bench_train.md" | tail -6
python benchmarks/bench_unet.py 2>&1 | tee "$out/bench_unet.md" | tail -10
