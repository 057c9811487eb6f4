#!/usr/bin/env bash
# The held-out-protocol rows of benchmarks/results/recover.md (issue 27), one heavy-lock job per row.
# Resumable: finished rows are skipped; a row paused at --max-minutes (exit 3; default 28 minutes of
# training, MAX_MINUTES=...) resumes from its checkpoint (bit for bit) in the next job, so that with the
# evaluation after training (~7 minutes) no locked job runs much past ~40 minutes.
#   bash benchmarks/recover_honest.sh                 # every row, in order
#   bash benchmarks/recover_honest.sh h-a70           # some rows
# Pruned starting models and checkpoints live in /work/cache-recover (bench_recover.py --cache);
# the recovered models are saved under $SAVE_DIR with an INDEX.md line each.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PRUNEKIT_DATA="${PRUNEKIT_DATA:-$(cd .. && pwd)/shared/data}"
SAVE_DIR="${SAVE_DIR:-/work/artifacts/recovered}"
HEAVY="${HEAVY:-/work/bin/heavy --tag ${TAG:-honest}}"
ROWS=("$@")
[ ${#ROWS[@]} -eq 0 ] && ROWS=(prep:dense prep:wanda50 h-w50 ctrl-kd-fast prep:sgpt70a h-a70 prep:blocks25 h-blocks25
                           prep:channels25 h-channels25)
# longer runs (about 2 h more): h-w50-long h-blocks25-long h-channels25-long ctrl-kd-fast-long ctrl-ce
mkdir -p "$SAVE_DIR"
for row in "${ROWS[@]}"; do
  while true; do
    echo "=== $(date -u +%H:%M:%S) $row"
    $HEAVY python benchmarks/bench_recover.py --rows "$row" --lock '' --max-minutes "${MAX_MINUTES:-28}" --save-dir "$SAVE_DIR"
    rc=$?
    [ $rc -eq 3 ] && { sleep 20; continue; }  # paused at a checkpoint: let others in, then resume
    [ $rc -ne 0 ] && exit $rc
    break
  done
  sleep 30  # between rows, a job waiting for the lock gets its turn
done
