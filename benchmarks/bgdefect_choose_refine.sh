#!/usr/bin/env bash
# Chooses bgdefect's Eq. 13 normalisation (method.generate.refine.normalize: none = the probabilities at 1/2 as
# printed, max = half of each map's peak) on training data: a product the mini prior was pretrained on (not one of the
# five held-out benchmark products), fold 0 only. One training run, two generated folders from the same seeds (the
# images are the same, only the output masks differ), and the downstream U-Net of protocol=bgdefect on that fold for
# each, beside the baseline. The setting with the higher pixel AP goes into experiment=bgdefect_synthetic.
# Every step resumes.
#
#   bash benchmarks/bgdefect_choose_refine.sh [run root, default runs/bg_choose] [product, default metal_nut]
set -euo pipefail
ROOT=${1:-runs/bg_choose}
P=${2:-metal_nut}
PY=${PY:-.venv/bin/python}
case "$P" in bottle|pill|cable|carpet|leather)
  echo "$P is a held-out benchmark product: choose settings on a pretraining product" >&2; exit 2;; esac
run="$ROOT/train_${P}_fold0"
if [ ! -f "$run/done" ]; then
  "$PY" scripts/train.py experiment=bgdefect_synthetic product="$P" split.fold=0 hydra.run.dir="$run"
  touch "$run/done"
fi
for norm in none max; do
  "$PY" scripts/generate.py checkpoint="$run" out_dir="$ROOT/generated_$norm" method.generate.refine.normalize="$norm"
  arms="[generated]"
  [ "$norm" = none ] && arms="[baseline,generated]"
  "$PY" scripts/eval_downstream.py experiment=downstream_synthetic protocol=bgdefect downstream=unet \
    "products=[$P]" "arms=$arms" "protocol.folds=[0]" generated="$ROOT/generated_$norm" \
    protocol.generated_per_type=50 hydra.run.dir="$ROOT/downstream_$norm"
done
