#!/usr/bin/env bash
# The accuracy tables committed in benchmarks/results/quality: the shipped demo model and
# its selector, every method the server has, keep 1.0 / 0.5 / 0.25 / 0.1 / 0.05, on N
# held-out scenes of each variant of both tasks (shapes: textured, plain; clutter: clutter,
# clutter-plain), through a real server, with accuracy by content density.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
n=${N:-400}
work=${WORK:-.cache/quality}
data=()
for variant in textured plain clutter clutter-plain; do
    [ -f "$work/$variant/items.jsonl" ] && [ "$(wc -l < "$work/$variant/items.jsonl")" -eq "$n" ] &&
        grep -q content_tokens "$work/$variant/items.jsonl" ||
        $bin/vllm-tokenprune make-eval-set --variant "$variant" --split test --n "$n" --out "$work/$variant"
    data+=(--data "$variant=$work/$variant/items.jsonl")
done
$bin/vllm-tokenprune eval "${data[@]}" --ratios 1.0,0.5,0.25,0.1,0.05 --out benchmarks/results/quality "$@"
