#!/usr/bin/env bash
# The comparisons of docs/results.md (rules 5 to 11): every run of a list, two at a time, one thread
# each.
#
#   bash bench/comparison.sh runs/v4                 # rule 5: 4 ways to train x seeds 0, 1, 2
#   bash bench/comparison.sh runs/v4 balanced-s1     # only the runs named
#   bash bench/comparison.sh runs/v5 balanced-s0 response-s0 balanced-s1 response-s1 balanced-s2 response-s2
#   (rules 7 and 8: the same six runs into runs/v6 and runs/v7)
#   bash bench/comparison.sh runs/v8 balanced-question-s0 balanced-question-s1 balanced-question-s2 response-question-s0 response-question-s1 response-question-s2
#   (rule 9: --reward answering-question; its untrained row is v7's)
#   bash bench/comparison.sh runs/v9 balanced-group-s0 balanced-group-s1 balanced-group-s2 balanced-group-s3 balanced-s3 response-s3
#   (rule 10: in a worktree of ae65cbd, rule 8's commit, with this file copied in)
#   bash bench/comparison.sh runs/v10 balanced-s0 response-s0 balanced-s1 response-s1 balanced-s2 response-s2
#   (rule 11: talk in place of an answer is -1; in a worktree of its commit)
#
# balanced-s0 is README's command as it is (`python balto.py`, the untrained policy scored before
# training); every other run skips that evaluation and prints no rollouts. Each run writes
# OUT/NAME/ (log.jsonl, metrics.json, the policy) and OUT/NAME.out (what it printed, ending with
# /usr/bin/time's "seconds s peak-KB KB"). python bench/compare.py OUT tabulates them.
set -euo pipefail
out=${1:?usage: bash bench/comparison.sh OUT [NAME ...]}
mkdir -p "$out"

runs() {  # one line per run: NAME ARGUMENTS...
  for seed in 0 1 2 3; do
    if [ "$seed" = 0 ]; then
      echo "balanced-s0"
    else
      echo "balanced-s$seed --seed $seed --no-eval-before --show-every 0"
    fi
    echo "response-s$seed --credit response --seed $seed --no-eval-before --show-every 0"
    echo "balanced-v3-s$seed --reward supported --seed $seed --no-eval-before --show-every 0"
    echo "fspo-s$seed --credit fspo --seed $seed --no-eval-before --show-every 0"
    echo "balanced-question-s$seed --reward answering-question --seed $seed --no-eval-before --show-every 0"
    echo "response-question-s$seed --credit response --reward answering-question --seed $seed --no-eval-before --show-every 0"
    echo "balanced-group-s$seed --credit balanced-group --seed $seed --no-eval-before --show-every 0"
  done
}

chosen() {  # the runs named on the command line, or rule 5's twelve
  if [ $# -eq 0 ]; then
    runs | awk '$1 !~ /-question-|-group-|-s3$/'
  else
    for name in "$@"; do
      runs | awk -v n="$name" '$1 == n'
    done
  fi
}

chosen "${@:2}" | OUT="$out" xargs -P 2 -L 1 bash -c '
  name=$0
  OMP_NUM_THREADS=1 /usr/bin/time -f "%e s %M KB" python balto.py "$@" --output-dir "$OUT/$name" \
    > "$OUT/$name.out" 2>&1
  echo "$(date -u +%H:%M) finished $name"'
