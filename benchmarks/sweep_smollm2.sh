#!/usr/bin/env bash
# Regenerates benchmarks/results/sweep/ (resumable: finished cells are skipped).
# Heavy: ~15-20 min on the shared 2-core CPU; run under the lock.
#   flock /tmp/prunekit-heavy.lock bash benchmarks/sweep_smollm2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PRUNEKIT_DATA="${PRUNEKIT_DATA:-$(cd .. && pwd)/shared/data}"
prunekit sweep smollm2-135m --dtype float32 --threads 1 \
  --methods wanda magnitude --allocations uniform --sparsities 0:0.8:0.1 \
  --calib austen --nsamples 16 --seqlen 512 --batch-size 8 --seed 0 \
  --eval wikitext2 --eval-seqlen 1024 --max-windows 4 \
  --tasks piqa general_knowledge qa_wikidata --limit piqa=70 --limit qa_wikidata=70 \
  --task-batch-size 16 \
  --out benchmarks/results/sweep --title "SmolLM2-135M: Wanda vs magnitude, uniform, 0-80% sparsity" "$@"
