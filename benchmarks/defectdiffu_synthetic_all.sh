#!/usr/bin/env bash
# DefectDiffu on the five held-out products of the synthetic world (issue 17's evidence), every step resumable:
#  1. the mini DiT prior (scripts/pretrain_dit.py; about 12 h on 2 CPU cores: run it where a GPU is, DEVICE=cuda);
#  2. one DefectDiffu model for the five products (experiment=defectdiffu_synthetic);
#  3. generated pairs per product (50 per type), their generation metrics, a w_d strength sweep per product;
#  4. zero-shot: a model trained with ZS_PRODUCT's defects removed, that product's defects generated from what the
#     others taught (Eq. 12), and the downstream gain on it;
#  5. the downstream U-Net of protocol=defectdiffu (half split, real + 2x generated pairs): baseline / generated /
#     oracle, and the zero-shot arm on ZS_PRODUCT.
#
#   DEVICE=cpu bash benchmarks/defectdiffu_synthetic_all.sh [run root, default runs/dd_v2]
set -euo pipefail
ROOT=${1:-runs/dd_v2}
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cpu}
ZS_PRODUCT=${ZS_PRODUCT:-pill}
PRODUCTS=(bottle pill cable carpet leather)
LIST=$(IFS=,; echo "${PRODUCTS[*]}")
if [ ! -f core/models/mini_dit/config.json ]; then
  "$PY" scripts/pretrain_dit.py device="$DEVICE" hydra.run.dir="$ROOT/pretrain_dit"
fi
for run in train train_zs; do
  extra=()
  [ "$run" = train_zs ] && extra=("method.train.exclude_defects_of=[$ZS_PRODUCT]")
  if [ ! -f "$ROOT/$run/model/config.json" ]; then
    "$PY" scripts/train.py experiment=defectdiffu_synthetic device="$DEVICE" hydra.run.dir="$ROOT/$run" "${extra[@]}"
  fi
done
for p in "${PRODUCTS[@]}"; do
  "$PY" scripts/generate.py checkpoint="$ROOT/train" product="$p" device="$DEVICE" out_dir="$ROOT/generated"
  "$PY" benchmarks/defectdiffu_strength.py --run "$ROOT/train" --product "$p" --n 8 --out "$ROOT/strength" \
    device="$DEVICE"
done
# zero-shot: the product's own type names, generated from the defects the other products taught
ZS_TYPES=$(ls "data/synthetic/seed0_res128/$ZS_PRODUCT/test" | grep -v good | paste -sd, -)
"$PY" scripts/generate.py checkpoint="$ROOT/train_zs" product="$ZS_PRODUCT" device="$DEVICE" \
  "method.generate.defects=[$ZS_TYPES]" out_dir="$ROOT/generated_zs"
"$PY" scripts/eval_generation.py generated="$ROOT/generated" hydra.run.dir="$ROOT/eval_generation"
"$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=defectdiffu downstream=unet \
  "products=[$LIST]" "arms=[baseline,generated,oracle]" generated="$ROOT/generated" hydra.run.dir="$ROOT/downstream"
"$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=defectdiffu downstream=unet \
  "products=[$ZS_PRODUCT]" "arms=[generated]" generated="$ROOT/generated_zs" hydra.run.dir="$ROOT/downstream_zs"
