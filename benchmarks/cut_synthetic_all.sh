#!/usr/bin/env bash
# CUT + VLAD on the five held-out products of the synthetic world with the mini prior v2 (issue 18's evidence); every
# step resumes. For k in K_LIST and each of SEEDS: CUT's anomalies from the k normal shots of each product (split
# k_shot, split.seed = the seed), then VLAD without / with them (protocol=cut: one model for all products) and
# PatchCore on the same shots (per product). CUT files its anomalies under its prompt's word ("damaged"), no dataset
# type: the evaluations take generated_types=free. Then, for k = 4 and seed 0: the generation metrics, and the downstream
# U-Net under AnomalyDiffusion's protocol (CUT's pairs + normals, against baseline / oracle, the oracle with 50 real
# defects per type as in benchmarks/anomalydiffusion_synthetic_all.sh).
#
#   K_LIST="1 2 4" SEEDS="0 1 2 3 4" bash benchmarks/cut_synthetic_all.sh [run root, default runs/cut_v2]
#   UNET_ARMS="[generated]" ...   # only CUT's arm: the baseline and oracle arms read no generated folder, so those of
#                                 # an AnomalyDiffusion run (same protocol, split, seeds, oracle_per_type) serve
set -euo pipefail
ROOT=${1:-runs/cut_v2}
PY=${PY:-.venv/bin/python}
K_LIST=${K_LIST:-1 2 4}
SEEDS=${SEEDS:-0 1 2 3 4}
UNET_ARMS=${UNET_ARMS:-[baseline,generated,oracle]}
PRODUCTS=(bottle pill cable carpet leather)
LIST=$(IFS=,; echo "${PRODUCTS[*]}")
for k in $K_LIST; do
  for s in $SEEDS; do
    gen="$ROOT/generated_k${k}_s${s}"
    for p in "${PRODUCTS[@]}"; do
      "$PY" scripts/generate.py experiment=cut_synthetic product="$p" split.k="$k" split.seed="$s" out_dir="$gen"
    done
    "$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=cut downstream=vlad generated_types=free \
      "products=[$LIST]" "arms=[baseline,generated]" generated="$gen" protocol.split.k="$k" protocol.split.seed="$s" \
      hydra.run.dir="$ROOT/vlad_k${k}_s${s}"
    "$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=cut downstream=patchcore \
      protocol.unified=false "products=[$LIST]" "arms=[baseline]" protocol.split.k="$k" protocol.split.seed="$s" \
      hydra.run.dir="$ROOT/patchcore_k${k}_s${s}"
  done
done
"$PY" scripts/eval_generation.py generated="$ROOT/generated_k4_s0" generated_types=free hydra.run.dir="$ROOT/eval_generation_k4_s0"
"$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=anomalydiffusion downstream=unet \
  "products=[$LIST]" "arms=$UNET_ARMS" generated="$ROOT/generated_k4_s0" generated_types=free oracle_per_type=50 \
  hydra.run.dir="$ROOT/unet_k4_s0"
