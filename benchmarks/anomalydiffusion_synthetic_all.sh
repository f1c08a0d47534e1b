#!/usr/bin/env bash
# AnomalyDiffusion on the five held-out products of the synthetic world with the mini prior v2: one model for all
# their (product, type) pairs, then per product three generated folders from the same seeds (AAR none / paper /
# official), the generation metrics of each (world-CLIP IS / FID(a) / CLIP score, alignment), and the downstream U-Net
# under AnomalyDiffusion's protocol: baseline / generated / oracle arms with the AAR-free folder, the generated arm
# alone for the other two with AAR_DOWNSTREAM=1 (the baseline and oracle arms are the same runs, seeds included, so
# they are not trained again). The oracle arm gets as many real defects per type as the generator made (50, oracle_per_type=50): the share
# of the oracle gap compares equal counts. With SEAS_GENERATED set (e.g. runs/seas_v2ft/generated), SeaS's pairs run under the same protocol too.
# Every step resumes. The AAR-free run takes the types' training masks, augmented (the synthetic experiment's default:
# its mask embeddings are trained too briefly to draw masks); MASKS=generated takes the mask generator's instead.
#
#   bash benchmarks/anomalydiffusion_synthetic_all.sh [run root, default runs/ad_v2] [extra overrides for train.py...]
set -euo pipefail
ROOT=${1:-runs/ad_v2}
shift || true
PY=${PY:-.venv/bin/python}
PRODUCTS=(bottle pill cable carpet leather)
LIST=$(IFS=,; echo "${PRODUCTS[*]}")
if [ ! -f "$ROOT/train/done" ]; then
  "$PY" scripts/train.py experiment=anomalydiffusion_synthetic hydra.run.dir="$ROOT/train" "$@"
  touch "$ROOT/train/done"
fi
for aar in none paper official; do
  for p in "${PRODUCTS[@]}"; do
    # the AAR variants reuse the masks of the AAR-free run item by item (the mask of item (type, i) does not depend
    # on AAR: it comes from its own stream), so the three folders differ only in the re-weighting
    masks=("method.generate.masks=${MASKS:-train}")
    [ "$aar" != none ] && masks=(method.generate.masks=folder "method.generate.mask_folder=$ROOT/generated_none")
    "$PY" scripts/generate.py checkpoint="$ROOT/train" product="$p" out_dir="$ROOT/generated_$aar" \
      method.generate.aar="$aar" "${masks[@]}"
  done
  "$PY" scripts/eval_generation.py generated="$ROOT/generated_$aar" hydra.run.dir="$ROOT/eval_generation_$aar"
  # the downstream U-Net (about 6 min per product and arm on 2 cores): the three arms on the AAR-free pairs; the AAR
  # variants' generated arms only with AAR_DOWNSTREAM=1 (they are compared on the generation metrics above anyway)
  [ "$aar" != none ] && [ "${AAR_DOWNSTREAM:-0}" != 1 ] && continue
  arms="[generated]"
  [ "$aar" = none ] && arms="[baseline,generated,oracle]"
  "$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=anomalydiffusion downstream=unet \
    "products=[$LIST]" "arms=$arms" generated="$ROOT/generated_$aar" oracle_per_type=50 \
    hydra.run.dir="$ROOT/downstream_$aar"
done
if [ -n "${SEAS_GENERATED:-}" ]; then
  "$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=anomalydiffusion downstream=unet \
    "products=[$LIST]" "arms=[generated]" generated="$SEAS_GENERATED" oracle_per_type=50 \
    hydra.run.dir="$ROOT/downstream_seas"
fi
