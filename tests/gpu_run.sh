#!/usr/bin/env bash
# Issue 5's GPU measurements in one device call (about 9 minutes on an H200: keep timeout_s at 600), most
# wanted first, each step under its own time limit so a slow one cannot cost the others. Logs and JSON go to
# $OUT; a summary is printed last. From the repository root:
#
#   bash tests/gpu_run.sh                 # the issue's targets; the device tool's `run` sets $OUT
#   bash tests/gpu_run.sh ablations       # a second call: XLA against Pallas routing and norms, batch 1
#
# The image's transformers may not be 5.23.0: download its wheel here into .whl/ (ignored through
# .git/info/exclude; the device README's Notes give the pip command) and name .whl in `carry`.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_run}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
step() { echo "== $(date +%T) $1" | tee -a "$OUT/progress.log"; }
bench() { python3 -m diffjax.cli bench --full-size --prompt 1024 --moe pallas --statistics pallas \
  --global-attention pallas --projections fused --blocks unstacked "$@"; }

step versions
{ python3 -c "import jax, flax, torch, transformers; print(jax.__version__, flax.__version__, torch.__version__, \
transformers.__version__)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } \
  > "$OUT/versions.txt" 2>&1

if [ "${1:-targets}" = ablations ]; then
  # A second call: what each of the newer kernels changes, on one set of weights at batch 1.
  step "batch 1: routing and norms, XLA against Pallas"
  timeout 540 bench --no-generate --batch 1 --sliding-attention pallas --routing xla pallas --norms xla pallas \
    --repeats 3 --json "$OUT/ablations.json" > "$OUT/ablations.log" 2>&1
  logs=ablations
else
  # The kernels have run on a GPU only as far as this file checks them: first, so a wrong one is seen.
  step "gpu_check"
  timeout 80 python3 tests/gpu_check.py > "$OUT/gpu_check.jsonl" 2> "$OUT/gpu_check.err"

  # The decoder step and the encoder canvas at batch 1 and 8 on one set of weights, every kernel, profiled:
  # the first and third targets, and where the time goes.
  step "batch 1 and 8: decoder step and encoder canvas, every kernel"
  timeout 280 bench --no-generate --batch 1 8 --sliding-attention pallas --routing pallas --norms pallas \
    --repeats 3 --profile "$OUT/profile" --json "$OUT/steps.json" > "$OUT/steps.log" 2>&1

  step "6 layers, whole generate loop, ours against transformers (static cache + torch.compile)"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout 170 bench --layers 6 --batch 1 --sliding-attention pallas \
    --routing pallas --norms pallas --with-transformers --repeats 2 --json "$OUT/transformers.json" \
    > "$OUT/transformers.log" 2>&1
  logs="steps transformers"
fi

step done
cat "$OUT/versions.txt"
[ -f "$OUT/gpu_check.jsonl" ] && { echo "--- gpu_check"; cat "$OUT/gpu_check.jsonl"; }
for log in $logs; do
  echo "--- $log"; grep -v "^\s*$" "$OUT/$log.log" | tail -25
done
