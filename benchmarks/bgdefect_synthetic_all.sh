#!/usr/bin/env bash
# Background-aware defect generation on the five held-out products of the synthetic world with the mini prior v2,
# under its two-fold protocol: per fold and product one training run (the fold's anomalies only), the fold's generated
# folder (generated_fold<f>, 50 pairs per type), the generation metrics of each fold's folder, and the downstream U-Net
# (protocol=bgdefect: baseline / bgdefect / oracle, each fold tested on the anomalies its generator never saw, the two
# folds averaged). The oracle arm gets as many real defects per type as the generator made (50). Every step resumes.
#
#   bash benchmarks/bgdefect_synthetic_all.sh [run root, default runs/bg_v2] [extra overrides for train.py...]
#   GEN_OVERRIDES="method.generate.x=y ..." adds overrides to every generate.py call (generation otherwise takes the
#   method settings each run recorded when it was trained)
set -euo pipefail
ROOT=${1:-runs/bg_v2}
shift || true
PY=${PY:-.venv/bin/python}
PRODUCTS=(bottle pill cable carpet leather)
LIST=$(IFS=,; echo "${PRODUCTS[*]}")
for f in 0 1; do
  for p in "${PRODUCTS[@]}"; do
    run="$ROOT/train_${p}_fold$f"
    if [ ! -f "$run/done" ]; then
      "$PY" scripts/train.py experiment=bgdefect_synthetic product="$p" split.fold="$f" hydra.run.dir="$run" "$@"
      touch "$run/done"
    fi
    # shellcheck disable=SC2086
    "$PY" scripts/generate.py checkpoint="$run" out_dir="$ROOT/generated_fold$f" ${GEN_OVERRIDES:-}
  done
  "$PY" scripts/eval_generation.py generated="$ROOT/generated_fold$f" hydra.run.dir="$ROOT/eval_generation_fold$f"
done
"$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=bgdefect downstream=unet \
  "products=[$LIST]" "arms=[baseline,generated,oracle]" "generated='$ROOT/generated_fold{fold}'" \
  protocol.generated_per_type=50 oracle_per_type=50 hydra.run.dir="$ROOT/downstream"
