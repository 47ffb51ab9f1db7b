#!/usr/bin/env bash
# On the GPU machine, in one command: build jetspec against that machine's torch,
# run the whole test suite (GPU tests included) and every benchmark, and write
# logs and JSON results into the folder named by the first argument.
#   bench/gpu.sh "$OUT"            (then copy "$OUT"/*.json into bench/results/<name>/)
set -uo pipefail
out=${1:?usage: bench/gpu.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv > "$out/device.txt" 2>&1
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' >> "$out/device.txt"
if ! python3 -m pip install -v --no-build-isolation --no-deps -e . > "$out/build.log" 2>&1; then
  tail -50 "$out/build.log"; exit 1
fi
# The compiler's resource report: registers, shared memory, stack and spills of every kernel.
cuobjdump --dump-resource-usage build/*/_C.abi3.so >> "$out/build.log" 2>&1
grep -E "spill|REG:|Function" "$out/build.log" | grep -vE "0 bytes spill" | head -30
python3 -m pytest -q -rs tests 2>&1 | tee "$out/tests.log" | tail -15
test_rc=${PIPESTATUS[0]}
python3 -m bench.run --out "$out" "${@:2}" 2>&1 | tee "$out/bench.log"
bench_rc=${PIPESTATUS[0]}
exit $(( test_rc || bench_rc ))
