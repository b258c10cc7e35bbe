#!/usr/bin/env bash
# The whole GPU check in one run (budget: 8 minutes on one H100), results as JSON.
#
# Inputs (environment variables):
#   OUT      folder for the results (default: gpu_check/); gpu_check.json is the summary
#   WHEELS   optional folder of wheels (cp3XX, manylinux) for what the box lacks: omegaconf,
#            antlr4-python3-runtime, pycocotools, optuna and their needs. They are installed with
#            --no-index --target into $OUT/site (torch/torchvision stay the box's own), and the
#            project runs from this checkout through PYTHONPATH. No network is used.
#   PYTHON   interpreter (default python3); it must already have torch + torchvision with CUDA.
#   SEEDS    seeds of the one-axis sweep (default 2); AXIS its axis (default loss)
# Usage, from the repository root:  WHEELS=.whl OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
PYTHON=${PYTHON:-python3}
SEEDS=${SEEDS:-2}
AXIS=${AXIS:-loss}
mkdir -p "$OUT"
if [ -n "${WHEELS:-}" ]; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$OUT/site" "$WHEELS"/*.whl || exit 1
  export PYTHONPATH="$OUT/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}" WANDB_MODE=disabled
ISTR=("$PYTHON" -m istr)
started=$(date +%s)
stamp() { echo $(( $(date +%s) - started )); }

# 1. CUDA tests (every test that skips without CUDA runs here), and the fast-path equivalence tests.
"$PYTHON" -m pytest -q -x -rs tests/test_fast_paths.py tests/test_codecs.py -k "cuda or fused or fast" \
  --junitxml "$OUT/cuda_tests.xml" > "$OUT/cuda_tests.log" 2>&1
tests_rc=$?
tests_s=$(stamp)

# 2. The paper's test size: R50, 800x1333, batch 1, bf16.
"${ISTR[@]}" bench --device cuda --backbone r50 --height 800 --width 1333 --batch 1 --iters 30 --warmup 5 \
  --json "$OUT/bench_800x1333.json" > "$OUT/bench.log" 2>&1
bench_rc=$?
bench_s=$(stamp)

# 3. A tiny train (the pretrained backbone is built first and timed apart).
"${ISTR[@]}" pretrain-backbone --preset tiny cache_dir="$OUT/cache" > "$OUT/pretrain.log" 2>&1
pretrain_s=$(stamp)
"${ISTR[@]}" train --config experiments/tiny.yaml --out "$OUT/tiny_run" cache_dir="$OUT/cache" \
  data.root="$OUT/synth_tiny96" logging.progress=false > "$OUT/tiny_train.log" 2>&1
train_rc=$?
train_s=$(stamp)

# 4. A one-axis sweep with $SEEDS seeds, cells packed onto the GPU by --workers.
sweep_start=$(date +%s)
"${ISTR[@]}" sweep "sweeps/$AXIS.yaml" --preset tiny --seeds "$SEEDS" --workers 3 --root "$OUT/sweeps" \
  --set cache_dir="$OUT/cache" --set data.root="$OUT/synth_tiny96" > "$OUT/sweep.log" 2>&1
sweep_rc=$?
sweep_wall=$(( $(date +%s) - sweep_start ))

"$PYTHON" - "$OUT" "$tests_rc" "$bench_rc" "$train_rc" "$sweep_rc" "$sweep_wall" \
  "$tests_s" "$bench_s" "$pretrain_s" "$train_s" "$(stamp)" <<'EOF'
import csv, json, pathlib, sys
import torch

out = pathlib.Path(sys.argv[1])
tests_rc, bench_rc, train_rc, sweep_rc, sweep_wall = map(int, sys.argv[2:7])
marks = dict(zip(("tests", "bench", "pretrain", "train", "sweep"), map(int, sys.argv[7:12])))
def read(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
rows = [r for f in out.glob("sweeps/*/results.csv") for r in csv.DictReader(f.open())]
summary = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "torch": torch.__version__,
    "exit_codes": {"cuda_tests": tests_rc, "bench": bench_rc, "tiny_train": train_rc, "sweep": sweep_rc},
    "seconds_since_start": marks,
    "bench_800x1333": read(out / "bench_800x1333.json"),
    "tiny_train": {"eval": read(out / "tiny_run" / "eval.json"), "summary": read(out / "tiny_run" / "train_summary.json")},
    "sweep": {"cells": len(rows), "wall_seconds": sweep_wall,
              "cells_per_gpu_hour": round(len(rows) * 3600 / sweep_wall, 1) if rows and sweep_wall else None},
}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps({k: summary[k] for k in ("device", "torch", "exit_codes", "seconds_since_start", "sweep")}, indent=2))
EOF
