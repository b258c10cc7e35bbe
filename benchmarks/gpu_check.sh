#!/usr/bin/env bash
# The whole GPU check in one run (budget: 8 minutes on one H100), results as JSON.
#
# Inputs (environment variables):
#   OUT      folder for the results (default: gpu_check/); gpu_check.json is the summary
#   WHEELS   optional folder of wheels (cp3XX, manylinux) for what the box lacks: omegaconf,
#            pycocotools, optuna and their needs (alembic, colorlog, mako, sqlalchemy). They are
#            installed with --no-index --target into $OUT/site (torch/torchvision stay the box's
#            own), and the project runs from this checkout through PYTHONPATH. No network is used.
#   PYTHON   interpreter (default python3); it must already have torch + torchvision with CUDA.
#   SEEDS    seeds of the one-axis sweep (default 2); AXIS its axis (default loss); its cells run as
#            3 x SEEDS worker processes sharing the GPU
#   RECIPES  optional: also run benchmarks/tiny_recipes.sh's variants (this file) in the same packed
#            phase, every one its own process on the same GPU
#   PACK_DEADLINE  seconds the packed phase (sweep + recipes) may take (default 330), cut so that the
#            whole script ends within TOTAL (default 480 s)
# Usage, from the repository root:  WHEELS=.whl OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
PYTHON=${PYTHON:-python3}
SEEDS=${SEEDS:-2}
AXIS=${AXIS:-loss}
PACK_DEADLINE=${PACK_DEADLINE:-330}
TOTAL=${TOTAL:-480}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$OUT/site" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$OUT/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" WANDB_MODE=disabled
ISTR=("$PYTHON" -m istr)
CACHE="$OUT/cache" DATA="$OUT/synth_tiny96"
started=$(date +%s)
stamp() { echo $(( $(date +%s) - started )); }
"$PYTHON" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1

# 1. CUDA tests (every test that skips without CUDA runs here), and the fast-path equivalence tests.
timeout 90 "$PYTHON" -m pytest -q -x -rs tests/test_fast_paths.py tests/test_codecs.py -m "not slow" \
  --junitxml "$OUT/cuda_tests.xml" > "$OUT/cuda_tests.log" 2>&1
tests_rc=$?
tests_s=$(stamp)

# 2. The paper's test size: R50, 800x1333, batch 1, bf16.
timeout 150 "${ISTR[@]}" bench --device cuda --backbone r50 --height 800 --width 1333 --batch 1 --iters 30 --warmup 5 \
  --json "$OUT/bench_800x1333.json" > "$OUT/bench.log" 2>&1
bench_rc=$?
bench_s=$(stamp)

# 3. The tiny preset's dataset and pretrained backbone (one-time costs, timed apart).
"${ISTR[@]}" pretrain-backbone --preset tiny cache_dir="$CACHE" data.root="$DATA" > "$OUT/pretrain.log" 2>&1
pretrain_rc=$?
pretrain_s=$(stamp)

# 4. Packed cells: a one-axis sweep with $SEEDS seeds (each cell a tiny train), plus the recipe
#    variants when RECIPES is set, every cell its own process on the one GPU.
pack_start=$(date +%s)
left=$(( TOTAL - 15 - $(stamp) ))
[ "$left" -lt "$PACK_DEADLINE" ] && PACK_DEADLINE=$left
OMP_NUM_THREADS=1 timeout "$PACK_DEADLINE" "${ISTR[@]}" sweep "sweeps/$AXIS.yaml" --preset tiny --seeds "$SEEDS" \
  --workers $(( 3 * SEEDS )) --root "$OUT/sweeps" --set cache_dir="$CACHE" --set data.root="$DATA" \
  --set logging.wandb=false --set train.num_threads=1 > "$OUT/sweep.log" 2>&1 &
sweep_pid=$!
if [ -n "${RECIPES:-}" ]; then
  OMP_NUM_THREADS=1 OUT="$OUT/recipes" RECIPES="$RECIPES" JOBS=64 DEADLINE=$(( PACK_DEADLINE > 30 ? PACK_DEADLINE - 15 : 15 )) \
    CACHE="$CACHE" DATA="$DATA" PYTHON="$PYTHON" bash benchmarks/tiny_recipes.sh > "$OUT/recipes.log" 2>&1
fi
wait "$sweep_pid"
sweep_rc=$?
pack_wall=$(( $(date +%s) - pack_start ))

"$PYTHON" - "$OUT" "$tests_rc" "$bench_rc" "$pretrain_rc" "$sweep_rc" "$pack_wall" \
  "$tests_s" "$bench_s" "$pretrain_s" "$(stamp)" <<'PY'
import csv, json, pathlib, statistics, sys
import torch

out = pathlib.Path(sys.argv[1])
tests_rc, bench_rc, pretrain_rc, sweep_rc, pack_wall = map(int, sys.argv[2:7])
marks = dict(zip(("tests", "bench", "pretrain", "packed"), map(int, sys.argv[7:11])))
def read(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
rows = [r for f in out.glob("sweeps/*/results.csv") for r in csv.DictReader(f.open())]
recipes = (read(out / "recipes" / "recipes.json") or {}).get("recipes", {})
finished_recipes = sum(r["finished"] for r in recipes.values())
sweep_done = max(len(rows), len(list(out.glob("sweeps/*/*/eval.json"))))  # results.csv is missing if the sweep was stopped
cells = sweep_done + finished_recipes
def median(key):
    values = [float(r[key]) for r in rows if r.get(key)]
    return round(statistics.median(values), 1) if values else None
summary = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__,
    "exit_codes": {"cuda_tests": tests_rc, "bench": bench_rc, "pretrain": pretrain_rc, "sweep": sweep_rc},
    "seconds_since_start": marks,
    "bench_800x1333": read(out / "bench_800x1333.json"),
    "sweep": {"cells": len(rows), "median_train_s": median("train_s"), "median_img_per_s": median("img_per_s"),
              "segm_AP": {f"{r.get('arm')}/s{r.get('seed')}": r.get("segm_AP") for r in rows}},
    "packed": {"cells_finished": cells, "sweep_cells": sweep_done, "recipe_cells": finished_recipes,
               "wall_seconds": pack_wall,
               "cells_per_gpu_hour": round(cells * 3600 / pack_wall, 1) if cells and pack_wall else None},
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: summary[k] for k in ("device", "torch", "exit_codes", "seconds_since_start", "sweep", "packed")},
                 indent=2))
PY
