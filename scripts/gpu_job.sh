#!/usr/bin/env bash
# One GPU job: benchmark, train the models (resumable), evaluate them, and pack weights, results and the
# training state into the output folder OUT.
#
#   bash scripts/gpu_job.sh                                    # on a GPU machine, from the project root
#   MODELS=multiscale EPOCHS=200 MINUTES=9 BATCH=1024 LR=2e-3 WARMUP=200 PRECISION=bf16-mixed \
#     CHANNELS_LAST=1 COMPILE=default bash scripts/gpu_job.sh
#
# The machine's Python needs the project's packages (`pip install -e ".[dev]"`, or an image with torch,
# torchvision, pytorch-lightning, torchdiffeq, tabulate and pytest).
#
# Settings (environment):
#   MODELS      models to train, in order (default: multiscale vardeq simple)
#   PARALLEL=1  train them at the same time, one process each, on the one GPU
#   EPOCHS, MINUTES (time budget per model), BATCH, LR, WARMUP, PRECISION, CHANNELS_LAST=1, COMPILE=<mode>
#   BENCH       ';'-separated flowbook.bench flag sets to run first, e.g.
#               "--batch-size 128; --batch-size 1024 --bf16 --channels-last --compile default --graphs"
#   CHECKS=1    first run tests/test_fast.py's GPU test for the models in MODELS (the fast path computes
#               what the eager model computes, on this GPU)
#   EXTRA       more flowbook.train flags ("--train-images 512" for a smoke test); EVAL_IMAGES=N: evaluate on N
#   OUT         the output folder (default runs/out)
#   STATE       a folder holding an earlier job's OUT (default .gpu-state): each run_<model>.tar found there
#               is unpacked into runs/<model>/ first, so training continues where that job stopped
#   NOTEBOOKS=1 at the end, run every chapter under nbval in full mode (needs the three checkpoints in
#               checkpoints/, else full mode would train for hours, and the wheels in .whl/)
#   PYTHON      the interpreter (default python3)
# MNIST: from $PATH_DATASETS, or from the four files in .mnist/, gzipped or not (ignored by git; carry it to a
# machine without a network), copied to /tmp/flowbook-data/MNIST/raw. With NOTEBOOKS=1, the wheels in .whl/ (see
# scripts/fetch_gpu_wheels.sh) are installed to /tmp/site first.
#
# OUT receives job.log, and per model <model>.pt (best weights) and run_<model>.tar (last.ckpt,
# train_summary.json, the results JSON <model>.json and the CSV log): copy them into STATE to resume on a
# fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/runs/out}"
MODELS="${MODELS:-multiscale vardeq simple}"
EPOCHS="${EPOCHS:-200}"
MINUTES="${MINUTES:-}"
BATCH="${BATCH:-128}"
LR="${LR:-1e-3}"
WARMUP="${WARMUP:-0}"
PRECISION="${PRECISION:-32-true}"
CHANNELS_LAST="${CHANNELS_LAST:-0}"
COMPILE="${COMPILE:-}"
PARALLEL="${PARALLEL:-0}"
BENCH="${BENCH:-}"
EXTRA="${EXTRA:-}"
EVAL_IMAGES="${EVAL_IMAGES:-}"
STATE="${STATE:-.gpu-state}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
LOG="$OUT/job.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "${NOTEBOOKS:-0}" = 1 ] && compgen -G ".whl/*.whl" > /dev/null; then  # Jupyter, for nbval
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [ -z "${PATH_DATASETS:-}" ] && [ -d .mnist ]; then
  mkdir -p /tmp/flowbook-data/MNIST/raw
  for f in .mnist/*-ubyte.gz; do [ -e "$f" ] && gunzip -c "$f" > "/tmp/flowbook-data/MNIST/raw/$(basename "$f" .gz)"; done
  for f in .mnist/*-ubyte; do [ -e "$f" ] && cp "$f" /tmp/flowbook-data/MNIST/raw/; done
  export PATH_DATASETS=/tmp/flowbook-data
fi
DEVICE="$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
"$PY" -c "import torch; print('torch', torch.__version__, 'device', torch.cuda.get_device_name() \
  if torch.cuda.is_available() else 'cpu')" | tee "$LOG"

if [ "${CHECKS:-0}" = 1 ]; then
  echo "== GPU checks of the fast path" | tee -a "$LOG"
  "$PY" -m pytest tests/test_fast.py -q -p no:cacheprovider -k "cuda and ($(echo $MODELS | sed 's/ / or /g'))" \
    2>&1 | grep -v "^W[0-9]" | tail -n 15 | tee -a "$LOG" \
    || { echo "the fast path differs from the eager model here: train without it" | tee -a "$LOG"; exit 1; }
fi
IFS=';' read -ra BENCHES <<< "${BENCH//$'\n'/ }"
for flags in "${BENCHES[@]}"; do
  [ -n "${flags// }" ] || continue
  echo "== bench $flags" | tee -a "$LOG"
  # shellcheck disable=SC2086
  "$PY" -m flowbook.bench --device "$DEVICE" $flags 2>&1 | grep -v "^W[0-9]" | tail -n 8 | tee -a "$LOG"
done

train_one() {  # model -> runs/<model>/, log runs/<model>/job.log
  local m=$1 run="runs/$1"
  mkdir -p "$run"
  if [ -f "$STATE/run_$m.tar" ] && [ ! -f "$run/last.ckpt" ]; then
    tar -xf "$STATE/run_$m.tar" -C "$run" && cp "$STATE/$m.pt" "$run/" 2>/dev/null || true
    echo "$m: resuming from $STATE/run_$m.tar"
  fi
  # shellcheck disable=SC2086
  "$PY" -m flowbook.train --model "$m" --out "$run" $([ -f "$run/last.ckpt" ] && echo --resume) --epochs "$EPOCHS" --batch-size "$BATCH" \
    --lr "$LR" --warmup-steps "$WARMUP" --precision "$PRECISION" ${MINUTES:+--max-minutes "$MINUTES"} \
    ${COMPILE:+--compile "$COMPILE"} $([ "$CHANNELS_LAST" = 1 ] && echo --channels-last) $EXTRA \
    > "$run/train.log" 2>&1 || { echo "$m: training failed"; tail -n 30 "$run/train.log"; return 1; }
  tail -n 25 "$run/train.log"
  "$PY" -m flowbook.evaluate --checkpoint "$run/$m.pt" ${EVAL_IMAGES:+--eval-images "$EVAL_IMAGES"} \
    $([ "$DEVICE" = cuda ] && echo --graphs) > "$run/eval.log" 2>&1 \
    || { echo "$m: evaluation failed"; tail -n 30 "$run/eval.log"; return 1; }
  tail -n 22 "$run/eval.log"
}

pack_one() {  # what a later job needs to resume, and the results, into $OUT
  local m=$1 run="runs/$1"
  [ -f "$run/$m.pt" ] && cp "$run/$m.pt" "$OUT/"
  (cd "$run" && tar -cf "$OUT/run_$m.tar" last.ckpt train_summary.json $(ls "$m.json" 2>/dev/null) \
    $(ls logs/version_*/metrics.csv 2>/dev/null)) || echo "$m: nothing to pack"
}

status=0
if [ "$PARALLEL" = 1 ]; then
  for m in $MODELS; do train_one "$m" > "runs/$m.job.log" 2>&1 & done
  wait || status=1
  for m in $MODELS; do echo "== $m" | tee -a "$LOG"; tee -a "$LOG" < "runs/$m.job.log"; done
else
  for m in $MODELS; do
    echo "== $m" | tee -a "$LOG"
    train_one "$m" 2>&1 | tee -a "$LOG" || status=1
  done
fi
for m in $MODELS; do pack_one "$m"; done

"$PY" - "$MODELS" <<'EOF' | tee -a "$LOG"
import json, sys
from pathlib import Path
from tabulate import tabulate
rows = []
for m in sys.argv[1].split():
    res = Path(f"runs/{m}/{m}.json")
    if res.exists():
        r = json.loads(res.read_text())
        rows.append([m, r["training"].get("epochs"), f"{r['test_bpd']:.4f}", f"{r['val_bpd']:.4f}",
                     r["training"].get("wall_s"), r["training"].get("train_img_per_s"),
                     f"{r['inference_ms']:.1f}", f"{r.get('inference_ms_graphs', 0):.2f}",
                     f"{r['sampling_ms']:.1f}", f"{r.get('sampling_ms_graphs', 0):.2f}"])
print(tabulate(rows, headers=["model", "epochs (best)", "test bpd", "val bpd", "train s", "train img/s",
                              "ll ms", "ll ms graphs", "sample ms", "sample ms graphs"]))
EOF
if [ "${NOTEBOOKS:-0}" = 1 ]; then
  if [ -f checkpoints/simple.pt ] && [ -f checkpoints/vardeq.pt ] && [ -f checkpoints/multiscale.pt ]; then
    echo "== chapters in full mode" | tee -a "$LOG"
    FLOWBOOK_MODE=full "$PY" -m pytest notebooks --nbval-lax -q -p no:cacheprovider --durations=0 2>&1 \
      | grep -v "^W[0-9]" | tail -n 40 | tee -a "$LOG" || status=1
  else
    echo "== chapters skipped: checkpoints/ lacks a model, and full mode would train it for hours" | tee -a "$LOG"
  fi
fi
echo "done (status $status): $(ls "$OUT")" | tee -a "$LOG"
exit $status
