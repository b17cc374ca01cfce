#!/usr/bin/env bash
# The accuracy table committed in benchmarks/results/quality: the shipped demo model and
# its selector, every method the server has, keep 1.0 / 0.5 / 0.25 / 0.1, on held-out
# scenes of both variants, through a real server. A few minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
n=${N:-400}
work=${WORK:-.cache/quality}
for variant in textured plain; do
    [ -f "$work/$variant/items.jsonl" ] && [ "$(wc -l < "$work/$variant/items.jsonl")" -eq "$n" ] ||
        $bin/vllm-tokenprune make-eval-set --variant "$variant" --split test --n "$n" --out "$work/$variant"
done
$bin/vllm-tokenprune eval --data textured="$work/textured/items.jsonl" --data plain="$work/plain/items.jsonl" \
    --out benchmarks/results/quality "$@"
