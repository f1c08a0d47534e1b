#!/usr/bin/env bash
# CUT + VLAD on the five held-out products of the synthetic world with the mini prior v2 (issue 18's evidence); every
# step resumes. For k in K_LIST and each of SEEDS: CUT's anomalies from the k normal shots of each product (split
# k_shot, split.seed = the seed), then VLAD without / with them (protocol=cut: one model for all products) and
# PatchCore on the same shots (per product). Then, for k = 4 and seed 0: the generation metrics, and the downstream
# U-Net under AnomalyDiffusion's protocol (a third of the real anomalies + CUT's, against baseline / oracle).
#
#   K_LIST="1 2 4" SEEDS="0 1 2 3 4" bash benchmarks/cut_synthetic_all.sh [run root, default runs/cut_v2]
set -euo pipefail
ROOT=${1:-runs/cut_v2}
PY=${PY:-.venv/bin/python}
K_LIST=${K_LIST:-1 2 4}
SEEDS=${SEEDS:-0 1 2 3 4}
PRODUCTS=(bottle pill cable carpet leather)
LIST=$(IFS=,; echo "${PRODUCTS[*]}")
for k in $K_LIST; do
  for s in $SEEDS; do
    gen="$ROOT/generated_k${k}_s${s}"
    for p in "${PRODUCTS[@]}"; do
      "$PY" scripts/generate.py experiment=cut_synthetic product="$p" split.k="$k" split.seed="$s" out_dir="$gen"
    done
    "$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=cut downstream=vlad \
      "products=[$LIST]" "arms=[baseline,generated]" generated="$gen" protocol.split.k="$k" protocol.split.seed="$s" \
      hydra.run.dir="$ROOT/vlad_k${k}_s${s}"
    "$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=cut downstream=patchcore \
      protocol.unified=false "products=[$LIST]" "arms=[baseline]" protocol.split.k="$k" protocol.split.seed="$s" \
      hydra.run.dir="$ROOT/patchcore_k${k}_s${s}"
  done
done
"$PY" scripts/eval_generation.py generated="$ROOT/generated_k4_s0" hydra.run.dir="$ROOT/eval_generation_k4_s0"
"$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=anomalydiffusion downstream=unet \
  "products=[$LIST]" "arms=[baseline,generated,oracle]" generated="$ROOT/generated_k4_s0" \
  hydra.run.dir="$ROOT/unet_k4_s0"
