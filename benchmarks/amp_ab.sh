#!/usr/bin/env bash
# The same seeds of the tiny preset on the plain fp32 path and on the fast path, and their paired difference
# (benchmarks/README.md, "Same results"; docs/method.md#training, "Precision").
#
# Inputs (environment variables):
#   OUT     a new output folder (default amp_ab/): one run dir per cell under $OUT/runs, $OUT/amp_ab.csv
#           (one row per cell) and $OUT/summary.txt (the paired difference of segm AP, fast - plain)
#   SEEDS   seeds (default "0 1 2 3 4")
#   JOBS    cells at a time, each pinned to its own core with taskset, one torch thread each (default 2)
#   PYTHON  interpreter (default python3)
# Extra arguments are overrides for every cell (e.g. train.max_steps=200 for a quick look).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-amp_ab}
SEEDS=${SEEDS:-0 1 2 3 4}
JOBS=${JOBS:-2}
PYTHON=${PYTHON:-python3}
if [ -e "$OUT" ]; then echo "amp_ab.sh: $OUT exists; give a new OUT" >&2; exit 2; fi
mkdir -p "$OUT/runs"

cells=()
for seed in $SEEDS; do cells+=("$seed:true" "$seed:false"); done
slot_run() {  # the cells of job slot $1 (every JOBS-th cell), on core $1
  local slot=$1 i
  shift
  for ((i = slot; i < ${#cells[@]}; i += JOBS)); do
    local seed=${cells[i]%:*} amp=${cells[i]#*:}
    local name="seed${seed}_$([ "$amp" = true ] && echo fast || echo plain)"
    taskset -c "$slot" "$PYTHON" -m istr train --config experiments/tiny.yaml --out "$OUT/runs/$name" \
      "seed=$seed" "train.amp=$amp" train.num_threads=1 logging.progress=false logging.wandb=false "$@" \
      < /dev/null > "$OUT/runs/$name.log" 2>&1 || echo "amp_ab.sh: $name failed, see $OUT/runs/$name.log" >&2
  done
}
for ((slot = 0; slot < JOBS; slot++)); do slot_run "$slot" "$@" & done
wait

"$PYTHON" - "$OUT" <<'PY' | tee "$OUT/summary.txt"
import csv, json, pathlib, statistics, sys

from scipy import stats

out = pathlib.Path(sys.argv[1])
rows = []
for run in sorted(p for p in (out / "runs").iterdir() if p.is_dir() and (p / "eval.json").is_file()):
    seed, path = run.name.removeprefix("seed").split("_")
    final, cost = json.loads((run / "eval.json").read_text()), json.loads((run / "cost.json").read_text())
    code = json.loads((run / "train_summary.json").read_text())["code_version"]
    rows.append({"seed": int(seed), "path": path, "segm_AP": round(final["segm"]["AP"], 3),
                 "bbox_AP": round(final["bbox"]["AP"], 3), "segm_AP50": round(final["segm"]["AP50"], 3),
                 "train_seconds": round(cost["train_seconds"], 1), "img_per_s": round(cost["img_per_s"], 2),
                 "commit": code["commit"][:12] + ("+dirty" if code["dirty"] else "")})
with open(out / "amp_ab.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
ap = {(r["seed"], r["path"]): r["segm_AP"] for r in rows}
seeds = sorted({s for s, _ in ap if (s, "fast") in ap and (s, "plain") in ap})
print("seed  plain  fast  fast-plain")
for s in seeds:
    print(f"{s:4d} {ap[s, 'plain']:6.2f} {ap[s, 'fast']:5.2f} {ap[s, 'fast'] - ap[s, 'plain']:+7.2f}")
diffs = [ap[s, "fast"] - ap[s, "plain"] for s in seeds]
if len(diffs) >= 2:
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = stats.t.ppf(0.975, len(diffs) - 1) * sd / len(diffs) ** 0.5
    p = stats.ttest_rel([ap[s, "fast"] for s in seeds], [ap[s, "plain"] for s in seeds]).pvalue
    print(f"n = {len(diffs)}: paired difference {mean:+.2f} AP, SD {sd:.2f}, 95% CI [{mean - half:+.2f}, "
          f"{mean + half:+.2f}], paired t p = {p:.2f}")
PY
