#!/usr/bin/env bash
# SeaS on all five held-out products of the synthetic world with the mini prior (model=mini: v2 by default),
# then the generation metrics per product and the downstream U-Net under the SeaS protocol (baseline / SeaS /
# oracle arms). Every step resumes: rerun the script after an interruption.
#
#   bash benchmarks/seas_synthetic_all.sh [run root, default runs/seas_v2] [extra overrides for train.py...]
#
# The evidence in seas/README.md and docs/evidence/seas/ was made with exactly this script.
set -euo pipefail
ROOT=${1:-runs/seas_v2}
shift || true
PY=${PY:-.venv/bin/python}
PRODUCTS=(bottle pill cable carpet leather)
for p in "${PRODUCTS[@]}"; do
  if [ ! -f "$ROOT/train_$p/done" ]; then
    "$PY" scripts/train.py experiment=seas_synthetic product="$p" hydra.run.dir="$ROOT/train_$p" "$@"
    touch "$ROOT/train_$p/done"
  fi
  "$PY" scripts/generate.py checkpoint="$ROOT/train_$p" out_dir="$ROOT/generated" n_per_type=50
done
"$PY" scripts/eval_generation.py generated="$ROOT/generated" hydra.run.dir="$ROOT/eval_generation"
"$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=seas downstream=unet \
  "products=[$(IFS=,; echo "${PRODUCTS[*]}")]" "arms=[baseline,generated,oracle]" generated="$ROOT/generated" \
  hydra.run.dir="$ROOT/downstream"
# the oracle arm again at the generated count (50 real defects per type, as the SeaS arm has 50 generated per type),
# so that the share of the oracle gap also compares equal counts (the arms above keep 100, as earlier tables)
"$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=seas downstream=unet \
  "products=[$(IFS=,; echo "${PRODUCTS[*]}")]" "arms=[oracle]" oracle_per_type=50 \
  hydra.run.dir="$ROOT/downstream_oracle50"
