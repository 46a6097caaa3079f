#!/usr/bin/env bash
# Re-measure the smoke leaderboard from runs: every committed entry (plus the rows named on the
# command line) is run again with the current code and target and re-submitted through
# `spdbench submit --replace`. Resumable: a run folder's finished cells are reused, and an entry
# whose records already name the current target's fingerprint is skipped.
#   bash scripts/rerun-leaderboard.sh [EXTRA_ATTACK ...]      (e.g. sds-t spd-advdm)
# Long: about 5-15 CPU minutes per entry on 2 cores. Runs land in spdbench-runs/rerun-*/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
current=$($PY -c "import spdbench; print(spdbench.load_target('tiny').fingerprint)")
rows=$($PY - "$@" <<'PYEOF'
import json, sys
from pathlib import Path
rows = {}
for e in sorted(Path("leaderboard/entries").iterdir()):
    recs = sorted((e / "records").glob("*.json"))
    if e.is_dir() and recs:
        r = json.loads(recs[0].read_text())
        rows[e.name] = (r["attack"], r.get("preset") or "-", r["target"]["fingerprint"])
for a in sys.argv[1:]:
    rows.setdefault(f"smoke-{a}", (a, "-", "new"))
for name, (attack, preset, fp) in rows.items():
    print(name, attack, preset, fp)
PYEOF
)
while read -r name attack preset fp; do
  [ -z "$name" ] && continue
  if [ "$fp" = "$current" ]; then echo "skip $name (already measured on tiny $current)"; continue; fi
  out=spdbench-runs/rerun-$name
  args=(--suite smoke --attack "$attack" --out "$out" --quiet)
  [ "$preset" != "-" ] && args+=(--preset "$preset")
  echo "== $name: spdbench run ${args[*]}  ($(date -u +%H:%M))"
  .venv/bin/spdbench run "${args[@]}" || { echo "RUN FAILED: $name"; continue; }
  .venv/bin/spdbench submit "$out" --name "$name" --replace --sample 1 || echo "SUBMIT FAILED: $name"
done <<< "$rows"
