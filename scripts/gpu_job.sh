#!/usr/bin/env bash
# One GPU job: train the models (resumable), evaluate them, and copy weights and results to $OUT.
#
#   bash scripts/gpu_job.sh                      # on a GPU machine, from the project root
#   MODELS="multiscale" EPOCHS=200 MINUTES=9 bash scripts/gpu_job.sh
#
# MNIST: from $PATH_DATASETS, or from the four .gz files in .mnist/ (carried to a machine without a
# network; `.mnist/` is ignored by git), unpacked to /tmp/flowbook-data/MNIST/raw.
# Resuming: a run folder runs/<model>/ with last.ckpt continues where it stopped; copy runs/ back in
# (or carry it) to continue on a fresh machine. Everything the job writes for you lands in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/out}"
MODELS="${MODELS:-multiscale vardeq simple}"
EPOCHS="${EPOCHS:-200}"
MINUTES="${MINUTES:-}"           # time budget per model (empty: none)
BATCH="${BATCH:-128}"
LR="${LR:-1e-3}"
WARMUP="${WARMUP:-0}"
PRECISION="${PRECISION:-32-true}"
EXTRA="${EXTRA:-}"               # more flowbook.train flags, e.g. "--train-images 512" for a smoke test
EVAL_IMAGES="${EVAL_IMAGES:-}"   # evaluate on the first N images only (smoke tests)
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ -z "${PATH_DATASETS:-}" ] && [ -d .mnist ]; then
  mkdir -p /tmp/flowbook-data/MNIST/raw
  for f in .mnist/*-ubyte.gz; do gunzip -c "$f" > "/tmp/flowbook-data/MNIST/raw/$(basename "$f" .gz)"; done
  export PATH_DATASETS=/tmp/flowbook-data
fi

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/job.log"
"$PY" -m flowbook.bench --device "$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')" \
  --steps 3 | tee -a "$OUT/job.log"
for m in $MODELS; do
  "$PY" -m flowbook.train --model "$m" --out "runs/$m" --resume --epochs "$EPOCHS" --batch-size "$BATCH" \
    --lr "$LR" --warmup-steps "$WARMUP" --precision "$PRECISION" ${MINUTES:+--max-minutes "$MINUTES"} $EXTRA \
    2>&1 | tail -n 40 | tee -a "$OUT/job.log"
  "$PY" -m flowbook.evaluate --checkpoint "runs/$m/$m.pt" ${EVAL_IMAGES:+--eval-images "$EVAL_IMAGES"} \
    2>&1 | tail -n 30 | tee -a "$OUT/job.log"
  cp "runs/$m/$m.pt" "runs/$m/$m.json" "$OUT/"
  cp "runs/$m/train_summary.json" "$OUT/${m}_train_summary.json"
done
echo "done: $(ls "$OUT")" | tee -a "$OUT/job.log"
