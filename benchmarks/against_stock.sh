#!/usr/bin/env bash
# The overhead benchmark whose results are committed in benchmarks/results/against-stock:
# the plugin at keep 1.0 against stock `vllm serve` of the same tiny LLaVA, where the API
# server's work weighs most. About 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
work=${WORK:-.cache/against-stock}
mkdir -p "$work"
[ -f "$work/model/config.json" ] || $bin/vllm-tokenprune make-tiny --arch llava --out "$work/model"
$bin/vllm-tokenprune bench --against-stock --model "$work/model" \
    --out benchmarks/results/against-stock --max-model-len 2048 "$@"
