#!/usr/bin/env bash
# Black-box rows for the leaderboard (issue 21): for every committed `smoke` entry (or the attacks
# named on the command line) whose `smoke-transfer-ATTACK` entry is missing, edit its protections
# with tiny-b -- the perturbations are the entry's own, re-used through --protections-from, so the
# white-box and black-box columns compare the same pixels -- and submit the run through
# `spdbench submit` (re-verified there). An attack without a smoke entry is crafted afresh.
# Resumable: finished cells of a run folder are reused; an existing entry is skipped.
#   bash scripts/transfer-rows.sh [ATTACK ...]       PY=/path/to/python (default .venv/bin/python)
# About 5-15 CPU minutes per attack on 2 cores (edits with 7 purifiers, then the submit's check).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
attacks=("$@")
if [ ${#attacks[@]} -eq 0 ]; then
  for e in leaderboard/entries/smoke-*/; do
    n=$(basename "$e"); a=${n#smoke-}
    case "$n" in smoke-transfer-*|smoke-inpaint-*) continue;; esac
    attacks+=("$a")
  done
fi
for a in "${attacks[@]}"; do
  name=smoke-transfer-$a
  if [ -d "leaderboard/entries/$name" ]; then echo "skip $name (already an entry)"; continue; fi
  src=leaderboard/entries/smoke-$a
  attack=$a; preset=()
  if [ -d "$src" ]; then  # the entry's own attack and preset (e.g. smoke-photoguard-encoder-madry)
    read -r attack p < <($PY -c "import json,glob,sys; r=json.load(open(sorted(glob.glob(sys.argv[1]+'/records/*.json'))[0])); print(r['attack'], r.get('preset') or '-')" "$src")
    [ "$p" != "-" ] && preset=(--preset "$p")
    from=(--protections-from "$src")
  else
    from=()
  fi
  out=spdbench-runs/transfer-$a
  echo "== $name: $attack ${preset[*]} ${from[*]} ($(date -u +%H:%M))"
  $PY -m spdbench.cli run --suite smoke-transfer --attack "$attack" "${preset[@]}" "${from[@]}" --out "$out" --quiet \
    || { echo "RUN FAILED: $name"; continue; }
  $PY -m spdbench.cli submit "$out" --name "$name" --sample 1 || echo "SUBMIT FAILED: $name"
done
