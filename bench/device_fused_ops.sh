#!/usr/bin/env bash
# On the GPU machine, in one command (~5 minutes on an H200): build jetspec against that machine's torch,
# run the rms_norm and skinny_gemm tests (GPU tests included), compute-sanitizer memcheck and racecheck
# on both kernels, and both benchmarks; logs and JSON results go into OUTDIR ($OUT by default), 7 files:
#   device.txt  build.log  tests.log  sanitizer.log  bench.log  rms_norm.json  skinny_gemm.json
#   bench/device_fused_ops.sh [OUTDIR]
# JETSPEC_BENCH_COMPILE=0 leaves out the torch.compile peers (their compiles are most of the bench time).
set -uo pipefail
out=${1:-${OUT:?usage: bench/device_fused_ops.sh OUTDIR (or set OUT)}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
start=$SECONDS
stamp() { echo "[$(( SECONDS - start )) s] $*"; }

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$out/device.txt" 2>&1
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' >> "$out/device.txt" 2>&1
stamp "build"
if ! python3 -m pip install -v --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
  tail -50 "$out/build.log"; exit 1
fi
# The compiler's resource report for these kernels: registers, shared memory, stack and spills.
{ echo; echo "== kernel resources"; cuobjdump --dump-resource-usage build/*/_C.abi3.so 2>&1 |
    grep -A1 -E "rms_norm_kernel|skinny_gemm_kernel"; } >> "$out/device.txt"
grep -iE "warning.*(rms_norm|skinny_gemm)|spill" "$out/build.log" | grep -v "0 bytes spill" | head -20

stamp "tests"
python3 -m pytest -q -rs tests/test_rms_norm.py tests/test_skinny_gemm.py 2>&1 | tee "$out/tests.log" | tail -15
test_rc=${PIPESTATUS[0]}

stamp "sanitizers"
sanitize_rc=0
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool" >> "$out/sanitizer.log"
  compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m bench.sanitize_fused_ops >> "$out/sanitizer.log" 2>&1
  rc=$?
  echo "== exit status $rc" >> "$out/sanitizer.log"
  sanitize_rc=$(( sanitize_rc || rc ))
done
grep -E "^== |ERROR SUMMARY|RACECHECK SUMMARY|MISMATCH" "$out/sanitizer.log"

stamp "benchmarks"
python3 -m bench.run --out "$out" --only rms_norm --only skinny_gemm 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
stamp "done: tests $test_rc, sanitizers $sanitize_rc, benchmarks $bench_rc"
exit $(( test_rc || sanitize_rc || bench_rc ))
