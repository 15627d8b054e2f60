#!/usr/bin/env bash
# The one prepared GPU call (issue #13): built to finish inside 8 minutes on one H100/H200, writes at
# most 8 files under $OUT and prints a short table last. See DEVELOPERS.md ("GPU checks").
#
#   bash scripts/gpu_check.sh              # on the GPU machine (through the device tool)
#   bash scripts/gpu_check.sh --dry-run    # any CPU: tiny sizes, kernels on the Triton interpreter,
#                                          # models on the reference backend (a test runs this)
#
# Steps (each its own process with its own time limit, so one failure does not hide the others):
#   1. kernel parity at production sizes (C=128, L=3, 100k edges): triton vs reference, fwd/bwd/double,
#      fp32 and fp64                                                    -> parity.json
#   2. MACE backend=triton == backend=reference (energy, forces)        -> mace_parity.json
#   3. scripts/bench_kernels.py: each kernel vs e3nn / torch reference, and cuEquivariance when its
#      wheels are installed (the table says "not installed" otherwise) -> kernels/results.{json,md}
#   4. scripts/bench_model.py cuda: MACE energy+forces per step and peak memory, fcc Cu from 1k atoms
#      to the largest that fits, fp32 and fp64; batched small cells    -> model_cuda.json
#   5. message-passing bandwidth against a device copy in the same run -> bandwidth.json
#   6. summary table                                                   -> summary.md (+ gpu_check.log)
# Wheels the GPU machine lacks (ase, vesin, cuEquivariance) travel in .whl* folders made by
# ../shared/tools/device-wheels.sh; they are installed here when present.
set -uo pipefail
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -gt 0 ]]; then echo "usage: $0 [--dry-run]" >&2; exit 2; fi
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT" || exit 2
LOG="$OUT/gpu_check.log"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, record the exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  if [[ $DRY == 1 ]]; then "$@"; else timeout --kill-after=10 "$limit" "$@"; fi
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  STATUS+=("$name=$rc")
}

main() {
  STATUS=()
  local dry=()
  if [[ $DRY == 1 ]]; then
    dry=(--dry-run)
    echo "# gpu_check DRY RUN on $(uname -m): tiny sizes, CPU; numbers mean nothing"
  else
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    local site=${MLPOT_SITE:-$(mktemp -d)}
    local wheels=(.whl/*.whl)
    if [[ -e ${wheels[0]} ]]; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || echo "# installing the carried wheels failed"
    fi
    if [[ -d $site ]]; then export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"; fi
    if ! $PY -m pip install -q --no-deps --no-build-isolation -e . ; then
      echo "# pip install -e . failed: running from the checkout (mlpot.o3.backend maps mlpot.kernels)"
      export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
  fi
  $PY - <<'EOF'
import importlib.util, torch
mods = {m: importlib.util.find_spec(m) is not None for m in ("triton", "e3nn", "ase", "vesin", "cuequivariance_torch")}
print("# torch", torch.__version__, "cuda", torch.cuda.is_available(), " ".join(f"{k}={'yes' if v else 'no'}" for k, v in mods.items()))
if not mods["cuequivariance_torch"]:
    print("# cuEquivariance is not installed: the comparison with it is skipped (bench_kernels says so)")
EOF
  local kernel_sizes=(--lmax 3 --channels 128 --edges 100000 --repeats 10 --device cuda --modes fwd fwd+bwd)
  local model_args=(--budget-s 110 --max-step-s 2.5)
  local parity_args=() mace_args=()
  if [[ $DRY == 1 ]]; then  # every code path once, at the least CPU time (the interpreter is slow)
    kernel_sizes=(--quick --device cpu --modes fwd+bwd --kernels sh mp)
    model_args=(--dtypes float64)
    parity_args=(--kernels sh,sc,mp --dtypes float64)
    mace_args=(--dtypes float64)
  fi
  step parity 130 $PY -m mlpot.bench.gpu_check parity --out "$OUT/parity.json" "${parity_args[@]}" "${dry[@]}"
  step mace 50 $PY -m mlpot.bench.gpu_check mace --out "$OUT/mace_parity.json" "${mace_args[@]}" "${dry[@]}"
  step bench_kernels 90 $PY scripts/bench_kernels.py "${kernel_sizes[@]}" --roofline --no-plot --out "$OUT/kernels"
  step bench_model 150 $PY scripts/bench_model.py cuda --json "$OUT/model_cuda.json" "${model_args[@]}" "${dry[@]}"
  step bandwidth 30 $PY -m mlpot.bench.gpu_check bandwidth --out "$OUT/bandwidth.json" "${dry[@]}"
  echo "# steps: ${STATUS[*]}"
  $PY -m mlpot.bench.gpu_check summary --out "$OUT"
  local s
  for s in "${STATUS[@]}"; do [[ ${s#*=} == 0 ]] || return 1; done
  return 0
}

main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
