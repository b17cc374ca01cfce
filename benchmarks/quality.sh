#!/usr/bin/env bash
# The accuracy tables in benchmarks/results: every method the server has, keep 1.0 / 0.5 /
# 0.25 / 0.1 / 0.05 and auto (the selector's budget predictor), on N held-out scenes of each
# variant in VARIANTS (default: all four), through a real server, with accuracy by content
# density. By default the shipped demo model; another (`vllm-tokenprune train-demo --out DIR`):
#   bash benchmarks/quality.sh --model DIR/model --selector DIR/selector.safetensors --out OUT
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
n=${N:-400}
work=${WORK:-.cache/quality}
data=()
for variant in ${VARIANTS:-textured plain clutter clutter-plain}; do
    [ -f "$work/$variant/items.jsonl" ] && [ "$(wc -l < "$work/$variant/items.jsonl")" -eq "$n" ] &&
        grep -q content_tokens "$work/$variant/items.jsonl" ||
        $bin/vllm-tokenprune make-eval-set --variant "$variant" --split test --n "$n" --out "$work/$variant"
    data+=(--data "$variant=$work/$variant/items.jsonl")
done
$bin/vllm-tokenprune eval "${data[@]}" --ratios 1.0,0.5,0.25,0.1,0.05,auto --out benchmarks/results/quality "$@"
