#!/usr/bin/env bash
# The comparison of docs/results.md (rule 4): every run of a list, two at a time, one thread each.
#
#   bash bench/comparison.sh runs/v3                          # the untrained policy, 7 modes x 3 seeds
#   bash bench/comparison.sh runs/v3 0.02 token balanced      # the two best again at kl-beta 0.02
#
# Each run writes OUT/NAME/ (log.jsonl, metrics.json, the policy) and OUT/NAME.out (what it printed,
# ending with /usr/bin/time's "seconds s peak-KB KB"). python bench/compare.py OUT tabulates them.
set -euo pipefail
out=${1:?usage: bash bench/comparison.sh OUT [KL_BETA MODE MODE]}
beta=${2:-}
mkdir -p "$out"

script_of() {  # the command that trains a mode: balto.py's modes, or a peer's script
  case $1 in
    tpo) echo "peers/tpo.py" ;;
    tlpo) echo "peers/tlpo.py" ;;
    *) echo "balto.py --credit $1" ;;
  esac
}

runs() {  # one line per run: NAME COMMAND...
  if [ -z "$beta" ]; then
    echo "base balto.py --steps 0"
    for seed in 0 1 2; do
      for mode in response fspo token balanced balanced-group tpo tlpo; do
        echo "$mode-s$seed $(script_of "$mode") --seed $seed"
      done
    done
  else
    for seed in 0 1 2; do
      for mode in "${@:3}"; do
        echo "$mode-kl$beta-s$seed $(script_of "$mode") --seed $seed --kl-beta $beta"
      done
    done
  fi
}

runs "$@" | OUT="$out" xargs -P 2 -L 1 bash -c '
  name=$0
  OMP_NUM_THREADS=1 /usr/bin/time -f "%e s %M KB" python "$@" --no-eval-before --show-every 0 \
    --output-dir "$OUT/$name" > "$OUT/$name.out" 2>&1
  echo "$(date -u +%H:%M) finished $name"'
