#!/usr/bin/env bash
# The GPU checks of mpoe (the `gpu` tests and the --device cuda benchmarks), in two parts, each one call of a
# machine lent for a few minutes (../shared/gpu/README.md installs the stack first). A session is lent about 15
# minutes of device time in all, the machine's start and the install included, so one part per session:
#   bash .gpu/on-device.sh 'bash bench/gpu_check.sh kernels'  # in-process gpu tests (3 min at most), the benchmarks
#   bash .gpu/on-device.sh 'bash bench/gpu_check.sh runs'     # mpoe-train end to end on the GPU (tests/test_gpu.py ...)
# Arguments after the part go to its pytest, so a later session can take up what an earlier one had no time for:
#   bash .gpu/on-device.sh 'bash bench/gpu_check.sh runs -k "not default_job and not published"'
# Steps run in order of what they tell, each under what is left of GPU_CHECK_BUDGET_S (default 480 s, inside the
# device tool's 600 s per command with the install): a step that would start too late is skipped, and one that
# runs out of time is interrupted (pytest then prints what passed so far), so every finished step's output
# comes back. Output goes to $OUT (the device tool's folder that comes back), else ./gpu-results: the pytest
# log (the device's name, torch and transformers versions at its top), each benchmark's table (.txt) and --json
# keys (.json; bench.lm_loss prints its keys in its table), 8 files at most, as the device tool brings back.
# A failing step is reported and the next one still runs.
set -u
OUT=${OUT:-gpu-results}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
mkdir -p "$OUT"
status=0
start=$SECONDS

step() { # name, command...: run it under the budget left, keep its output, remember a failure
  local name=$1
  shift
  local left=$((BUDGET_S - (SECONDS - start)))
  if [ "$left" -lt 30 ]; then
    echo "== $name SKIPPED: the budget of ${BUDGET_S} s is spent" | tee -a "$OUT/$name.txt"
    status=1
    return
  fi
  local limit=$left cap=${STEP_CAP_S:-$left}  # a step may get less than what is left, so that later ones still run
  [ "$cap" -lt "$left" ] && limit=$cap
  echo "== $name (${left} s left, this step ${limit} s at most): $*"
  timeout --signal=INT --kill-after=30 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}  # the command's status, not tee's; the pipe is drained before the next line
  [ "$rc" -eq 0 ] || { echo "== $name FAILED ($rc; 124 = out of time)"; status=1; }
  echo "== $name done at $((SECONDS - start)) s"
}

part=${1:-}
shift || true
{ # what ran where: at the top of the part's pytest log
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(), '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__)"
} 2>&1 | tee "$OUT/tests_$part.txt"

case "$part" in
  kernels)
    STEP_CAP_S=180 step tests_kernels python3 -m pytest -q -m gpu -p no:cacheprovider \
      tests/test_expert_backends.py tests/test_dispatch_sync_free.py tests/test_grad_mask.py tests/test_bench.py \
      tests/test_compile.py tests/test_lm_loss.py tests/test_combine.py tests/test_weight_recompute.py \
      tests/test_activation_checkpointing.py "$@"
    # The short tables first; train_step, which builds six engines and compiles three models, last
    step moe_layer python3 -m bench.moe_layer --device cuda --json "$OUT/moe_layer.json"
    step experts python3 -m bench.experts --device cuda --json "$OUT/experts.json"
    step lm_loss python3 -m bench.lm_loss --device cuda
    step train_step python3 -m bench.train_step --device cuda --compile --json "$OUT/train_step.json"
    ;;
  runs)
    step tests_runs python3 -m pytest -q -m gpu -p no:cacheprovider --durations=0 \
      tests/test_gpu.py tests/test_low_precision_steps.py "$@"
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh kernels|runs" >&2
    exit 2
    ;;
esac
exit $status
