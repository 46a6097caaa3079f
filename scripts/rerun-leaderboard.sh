#!/usr/bin/env bash
# Re-measure the leaderboard from runs: every committed entry whose suite's target has changed,
# every entry of leaderboard/pending.json (taken off to be re-measured) and the rows named on the
# command line (on smoke) are run again with the current code and
# target and re-submitted through `spdbench submit --replace`. Cheapest entries first (by the
# time their old records took). Resumable: a run folder's finished cells are reused, and an entry
# whose records already name its suite target's current fingerprint is skipped.
#   bash scripts/rerun-leaderboard.sh [EXTRA_ATTACK ...]      (e.g. sds-t spd-advdm)
#   PY=/path/to/python bash scripts/rerun-leaderboard.sh     (default .venv/bin/python)
# Long: about 3-20 CPU minutes per entry on 2 cores. Runs land in spdbench-runs/rerun-*/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
rows=$($PY - "$@" <<'PYEOF'
import json, sys
from pathlib import Path
from spdbench import load_target
from spdbench.suites import get_suite
fps = {}
def current(suite):
    if suite not in fps:
        fps[suite] = load_target(get_suite(suite).target).fingerprint
    return fps[suite]
rows = []
for e in sorted(Path("leaderboard/entries").iterdir()):
    recs = sorted((e / "records").glob("*.json"))
    if not (e.is_dir() and recs):
        continue
    r = [json.loads(p.read_text()) for p in recs]
    cost = sum(sum(v or 0 for k, v in x["timing"].items() if k.endswith("_s")) for x in r)
    fresh = r[0]["target"]["fingerprint"] == current(r[0]["suite"])
    rows.append((cost, e.name, r[0]["attack"], r[0].get("preset") or "-", r[0]["suite"], "skip" if fresh else "run"))
pending = Path("leaderboard/pending.json")  # entries taken off to be re-measured on a new target
for p in (json.loads(pending.read_text())["entries"] if pending.is_file() else []):
    if not any(x[1] == p["name"] for x in rows):
        rows.append((p.get("cost_s", 1e8), p["name"], p["attack"], p.get("preset") or "-", p["suite"], "run"))
for a in sys.argv[1:]:
    if not any(x[1] == f"smoke-{a}" for x in rows):
        rows.append((1e9, f"smoke-{a}", a, "-", "smoke", "run"))
for cost, name, attack, preset, suite, what in sorted(rows):
    print(name, attack, preset, suite, what)
PYEOF
) || { echo "could not list the entries"; exit 1; }
while read -r name attack preset suite what; do
  [ -z "$name" ] && continue
  if [ "$what" = skip ]; then echo "skip $name (already measured on $suite's current target)"; continue; fi
  out=spdbench-runs/rerun-$name
  args=(--suite "$suite" --attack "$attack" --out "$out" --quiet)
  [ "$preset" != "-" ] && args+=(--preset "$preset")
  echo "== $name: spdbench run ${args[*]}  ($(date -u +%H:%M))"
  $PY -m spdbench.cli run "${args[@]}" || { echo "RUN FAILED: $name"; continue; }
  if $PY -m spdbench.cli submit "$out" --name "$name" --replace --sample 1; then
    $PY - "$name" <<'PYEOF'
import json, sys
from pathlib import Path
p = Path("leaderboard/pending.json")
if p.is_file():
    data = json.loads(p.read_text())
    data["entries"] = [e for e in data["entries"] if e["name"] != sys.argv[1]]
    p.write_text(json.dumps(data, indent=1) + "\n")
PYEOF
  else
    echo "SUBMIT FAILED: $name"
  fi
  echo "== $name done ($(date -u +%H:%M))"
done <<< "$rows"
