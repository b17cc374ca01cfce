#!/usr/bin/env bash
# The CPU benchmark whose results are committed in benchmarks/results/cpu-bench-llava:
# a prefill-bound LLaVA (make-tiny --preset bench), a selector trained on its tower's
# features, then the full sweep and a soak against one server. About 20 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
work=${WORK:-.cache/bench}
mkdir -p "$work"
[ -f "$work/model/config.json" ] || $bin/vllm-tokenprune make-tiny --arch llava --preset bench --out "$work/model"
[ -d "$work/images" ] || $bin/python -c "from vllm_tokenprune.testbed.synthetic import write_image_folder as w; w('$work/images', 64, seed=0, size=336)"
# Timing needs a selector of the real shape, not a good one: a short run (~3 min) will do.
[ -f "$work/selector.safetensors" ] || $bin/vllm-tokenprune train --model "$work/model" \
    --images "$work/images" --out "$work/selector.safetensors" --steps 120 --batch-size 8
$bin/vllm-tokenprune bench --model "$work/model" --selector "$work/selector.safetensors" \
    --out benchmarks/results/cpu-bench-llava --soak-seconds 180 --max-model-len 2048 "$@"
