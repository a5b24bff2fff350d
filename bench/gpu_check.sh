#!/usr/bin/env bash
# The GPU checks of mpoe (the `gpu` tests and the --device cuda benchmarks), in two parts that each fit one call
# of a machine lent for a few minutes (../shared/gpu/README.md installs the stack first):
#   bash .gpu/on-device.sh 'bash bench/gpu_check.sh kernels'  # in-process gpu tests, then the three benchmarks
#   bash .gpu/on-device.sh 'bash bench/gpu_check.sh runs'     # mpoe-train end to end on the GPU (tests/test_gpu.py ...)
# Output goes to $OUT (the device tool's folder that comes back), else ./gpu-results: the pytest logs and each
# benchmark's table (.txt) and --json keys (.json). A failing step is reported and the next one still runs.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
status=0

step() { # name, command...: run it, keep its output, remember a failure
  local name=$1
  shift
  echo "== $name: $*"
  "$@" > >(tee "$OUT/$name.txt") 2>&1 || { echo "== $name FAILED ($?)"; status=1; }
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/device.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  >> "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

case "${1:-}" in
  kernels)
    step tests_kernels python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_expert_backends.py tests/test_dispatch_sync_free.py tests/test_grad_mask.py tests/test_bench.py \
      tests/test_compile.py
    step experts python3 -m bench.experts --device cuda --json "$OUT/experts.json"
    step moe_layer python3 -m bench.moe_layer --device cuda --json "$OUT/moe_layer.json"
    step train_step python3 -m bench.train_step --device cuda --compile --json "$OUT/train_step.json"
    ;;
  runs)
    step tests_runs python3 -m pytest -q -m gpu -p no:cacheprovider --durations=0 \
      tests/test_gpu.py tests/test_low_precision_steps.py
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh kernels|runs" >&2
    exit 2
    ;;
esac
exit $status
