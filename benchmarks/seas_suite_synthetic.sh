#!/usr/bin/env bash
# The rest of SeaS's downstream suite on the five held-out products of the synthetic world: LFD (supervised
# segmenter, Tab. 4 / 26-27), GLASS (synthesis-based detector, Tab. 2: generated pairs replace its local synthetic
# anomalies), HVQ-Trans and MambaAD (unsupervised, Tab. 3: generated normals join the training set), each with the
# baseline / SeaS / oracle arms under protocol=seas at the CPU budget of experiment=downstream_synthetic (600 steps).
# The oracle arm gets 50 real defects per type, as many as SeaS generated (runs/seas_v2ft made 50 per type), so the
# share of the oracle gap compares equal counts. Every step resumes; each model's run times are in its results.
#
#   bash benchmarks/seas_suite_synthetic.sh [run root, default runs/seas_suite] [SeaS generated folder]
#   MODELS="lfd glass" bash benchmarks/seas_suite_synthetic.sh ...    # a subset
set -euo pipefail
ROOT=${1:-runs/seas_suite}
GENERATED=${2:-runs/seas_v2ft/generated}
PY=${PY:-.venv/bin/python}
PRODUCTS=(bottle pill cable carpet leather)
LIST=$(IFS=,; echo "${PRODUCTS[*]}")
# MambaAD's CPU size: its selective scan is a sequential loop (the CUDA kernel is GPU-only), 1024 steps per VSS block
# at the 32 x 32 level. A training step at the official 8 directions and batch 16 takes about 80 s on one core (about
# 13 h per arm at 600 steps); 2 directions (the Hilbert path and its reverse) at batch 4 take about 3-4 s. Said in the
# results beside the numbers.
MAMBAAD_CPU=(downstream.num_direction=2 downstream.train.batch_size=4)
for model in ${MODELS:-lfd glass hvqtrans mambaad}; do
  extra=()
  [ "$model" = mambaad ] && extra=("${MAMBAAD_CPU[@]}")
  "$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=seas downstream="$model" \
    "products=[$LIST]" "arms=[baseline,generated,oracle]" generated="$GENERATED" oracle_per_type=50 \
    hydra.run.dir="$ROOT/$model" "${extra[@]}"
done
