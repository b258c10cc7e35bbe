#!/usr/bin/env bash
# Tiny-preset recipe variants side by side (the search behind experiments/tiny.yaml; benchmarks/README.md).
#
# Inputs (environment variables):
#   OUT       output folder (default tiny_recipes/): one run dir per variant under $OUT/runs, and
#             $OUT/recipes.json, each variant's eval curve (segm/box AP at every eval), train_s, img/s
#   RECIPES   variant list (default benchmarks/tiny_recipes.txt), one "name override ..." per line
#   ONLY      optional space-separated names to run (default: every line)
#   JOBS      variants run at once (default 1; on one GPU, all of them: each is one process)
#   DEADLINE  seconds after which unfinished variants are stopped (default 0: none); their evals so far stay
#   CACHE     cache_dir (default runs/cache); DATA: data.root (default: the preset's)
#   EVAL_EVERY  train.eval_every (default 400), the points of each learning curve
#   PYTHON    interpreter (default python3)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-tiny_recipes}
RECIPES=${RECIPES:-benchmarks/tiny_recipes.txt}
JOBS=${JOBS:-1}
DEADLINE=${DEADLINE:-0}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT/runs"
common=("cache_dir=${CACHE:-runs/cache}" "train.eval_every=${EVAL_EVERY:-400}" logging.progress=false logging.wandb=false)
[ -n "${DATA:-}" ] && common+=("data.root=$DATA")
started=$(date +%s)
while read -r name overrides; do
  case "$name" in ''|'#'*) continue ;; esac
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  left=0  # timeout 0 = no limit
  if [ "$DEADLINE" -gt 0 ]; then
    left=$(( DEADLINE - ($(date +%s) - started) ))
    [ "$left" -le 0 ] && break
  fi
  # shellcheck disable=SC2086  # the overrides are words; $OUT inside them is this script's folder
  eval "set -- $overrides"
  timeout "$left" "$PYTHON" -m istr train --config experiments/tiny.yaml --out "$OUT/runs/$name" \
    "${common[@]}" "$@" < /dev/null > "$OUT/runs/$name.log" 2>&1 &
done < "$RECIPES"
wait
"$PYTHON" - "$OUT" "$(( $(date +%s) - started ))" <<'PY'
import json, pathlib, sys

out, wall = pathlib.Path(sys.argv[1]), int(sys.argv[2])
recipes = {}
for run in sorted(p for p in (out / "runs").iterdir() if p.is_dir()):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").is_file() else []
    curve = {r["step"]: {k: round(r[f"eval/{k}"], 2) for k in ("segm_AP", "segm_AP50", "bbox_AP")}
             for r in rows if "eval/segm_AP" in r}
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").is_file() else None
    if summary and (run / "eval.json").is_file():  # the final eval is in eval.json, not metrics.jsonl
        final = json.loads((run / "eval.json").read_text())
        curve[summary["steps"]] = {"segm_AP": round(final["segm"]["AP"], 2), "segm_AP50": round(final["segm"]["AP50"], 2),
                                   "bbox_AP": round(final["bbox"]["AP"], 2)}
    recipes[run.name] = {"curve": curve, "finished": summary is not None, "summary": summary}
(out / "recipes.json").write_text(json.dumps({"wall_seconds": wall, "recipes": recipes}, indent=1))
for name, r in recipes.items():
    print(f"{name:12s} finished={r['finished']!s:5s} " + " ".join(f"{s}:{v['segm_AP']}/{v['segm_AP50']}" for s, v in r["curve"].items()))
print(f"{len(recipes)} variants in {wall} s")
PY
