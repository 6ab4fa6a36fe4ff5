#!/usr/bin/env bash
# Issue 5's GPU measurements in one device call, most wanted first (about 9.5 minutes on an H200). Each step
# runs under the smaller of its own limit and what is left of BUDGET seconds (default 585: a `run` with
# timeout_s=600), so a slow step cannot cost the summary. Logs and JSON go to $OUT, at most 8 files (the device
# tool brings back no more); a summary is printed last. From the repository root:
#
#   bash tests/gpu_run.sh                        # the issue's targets; the device tool's `run` sets $OUT
#   BUDGET=240 bash tests/gpu_run.sh sweeps      # a second call: tile sweeps of the router, attention and MLP
#                                                #   kernels
#   BUDGET=240 bash tests/gpu_run.sh ablations   # or: XLA compile options (CUDA graphs off, no Triton
#                                                #   matmuls) against the defaults, batch 1, one process
#   BUDGET=400 bash tests/gpu_run.sh sizes       # or: the other sizes, batch 4 and 16 at prompt 1K,
#                                                #   then batch 1 at prompt 32K
#   BUDGET=240 bash tests/gpu_run.sh tiles       # or: the whole step at batch 1, then 8, under the kernel tile
#                                                #   settings the sweeps and the machine code point to (decoder
#                                                #   only: ~90 s of weights, then ~25 s a variant and batch)
#
# The image's transformers may not be 5.23.0: download its wheel here into .whl/ (ignored through
# .git/info/exclude; the device README's Notes give the pip command) and name .whl in `carry`.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_run}
BUDGET=${BUDGET:-585}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 PYTHONUNBUFFERED=1
step() { echo "== $(date +%T) (${SECONDS} s) $1" | tee -a "$OUT/progress.log"; }
limit() { local left=$((BUDGET - 15 - SECONDS)); echo $(( $1 < left ? $1 : (left > 1 ? left : 1) )); }
# An array, not a function: `timeout` runs programs only.
bench=(python3 -m diffjax.cli bench --full-size --prompt 1024 --moe pallas --statistics pallas
  --global-attention pallas --projections fused --blocks unstacked --sliding-attention pallas)

step versions
{ python3 -c "import jax, flax, torch, transformers; print(jax.__version__, flax.__version__, torch.__version__, \
transformers.__version__)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; } \
  >> "$OUT/progress.log" 2>&1

if [ "${1:-targets}" = sweeps ]; then
  # Kernel level, released shapes, batch 1 and 8: the router (34 us a layer at batch 1, its defaults) and the
  # split-K attention (~110 TFLOP/s at batch 8, its defaults) under each candidate tile setting.
  step "tile sweeps: routing, sliding and global attention, the MLP in the expert launches"
  timeout "$(limit 540)" python3 -m diffjax.kernels.bench --sweep --sections sliding routing attention mlp \
    --rows 1 8 --prompts 1024 --repeats 3 --out "$OUT/sweeps.json" > "$OUT/sweeps.log" 2>&1
  # Kept on the machine for a `tiles` call after this one: it times the winners in the whole step.
  cp "$OUT/sweeps.json" /tmp/diffjax_sweeps.json 2>/dev/null
  logs=sweeps
elif [ "${1:-targets}" = ablations ]; then
  # Where the ~3.7 ms between a batch-1 step's kernels go: the step without CUDA graphs (does it run as one
  # now?) and with every matmul on cuBLAS (no Triton split-k and its reduction launch), on one set of weights.
  step "batch 1: XLA options against the defaults"
  timeout "$(limit 540)" "${bench[@]}" --no-generate --decoder-only --batch 1 --routing pallas --norms pallas --repeats 3 \
    --xla-options "" "xla_gpu_enable_command_buffer=" "xla_gpu_enable_triton_gemm=false" \
    --json "$OUT/ablations.json" > "$OUT/ablations.log" 2>&1
  logs=ablations
elif [ "${1:-targets}" = tiles ]; then
  # The step itself, not a kernel alone, under the tile candidates (`Config.kernel_tiles`, one process, one set
  # of weights; batch 1's variants first). The sliding layers' split-K kernel with 128-row, 64-key blocks: its
  # two warpgroups then own 64 query rows each, and its MMAs are m64n64 (scores) and m64n256 (values) where the
  # defaults' shared 64-row block splits them into m64n16 and m64n128 (`python -m diffjax.kernels.codegen
  # --sections sliding --tiles block_q=128 block_k=64`: 230-247 registers, no spill, same program count). Its
  # 64-key blocks alone. And the router's scores from XLA's matmul instead of 8 programs that each stream the
  # whole router (34 us a layer at batch 1).
  # After a `sweeps` call on the same machine, its winners at 1 and 8 rows come first (`best_kernel_tiles`).
  kernels="--routing pallas --norms pallas --mlp xla"
  tiles=("")
  if [ -f /tmp/diffjax_sweeps.json ]; then
    mapfile -t won < <(python3 -c "import json; t = json.load(open('/tmp/diffjax_sweeps.json')).get('best_kernel_tiles', {}); \
print('\n'.join(dict.fromkeys(v for v in t.values() if v)))")
    tiles+=("${won[@]}")
  fi
  tiles+=("sliding_attention.block_q=128,sliding_attention.block_k=64" "routing.project=false" \
    "sliding_attention.block_k=64")
  mapfile -t tiles < <(printf '%s\n' "${tiles[@]}" | awk '!seen[$0]++')  # each variant once
  printf 'tile variants: %s\n' "${tiles[@]}" >> "$OUT/progress.log"
  step "batch 1 and 8: the step under kernel tile variants"
  timeout "$(limit 540)" "${bench[@]}" --no-generate --decoder-only --batch 1 8 $kernels --repeats 3 --tiles "${tiles[@]}" \
    --json "$OUT/tiles.json" > "$OUT/tiles.log" 2>&1
  logs=tiles
elif [ "${1:-targets}" = sizes ]; then
  # The table's other rows (issue 5): batch 4 and 16 at prompt 1K in one process, then a 32K prompt at batch 1
  # (its prefill takes a while; a later --prompt replaces the one in bench), every kernel but the
  # MLP's (2026-11-28: 1.4 ms slower a step).
  kernels="--routing pallas --norms pallas --mlp xla"
  step "batch 4 and 16, prompt 1K"
  timeout "$(limit 240)" "${bench[@]}" --no-generate --batch 4 16 $kernels --repeats 3 --json "$OUT/sizes.json" \
    > "$OUT/sizes.log" 2>&1
  step "batch 1, prompt 32K"
  timeout "$(limit 240)" "${bench[@]}" --prompt 32768 --no-generate --batch 1 $kernels --repeats 3 \
    --json "$OUT/long.json" > "$OUT/long.log" 2>&1
  logs="sizes long"
else
  # The kernels have run on a GPU only as far as this file checks them: first, so a wrong one is seen (every
  # check passed on 2026-11-28 in 110 s; the newest kernels come first).
  step "gpu_check"
  timeout "$(limit 80)" python3 tests/gpu_check.py > "$OUT/gpu_check.jsonl" 2>> "$OUT/progress.log"

  # The decoder step (one call, three queued, four in one compiled loop) and the encoder canvas at batch 1 and
  # 8 on one set of weights, every kernel but the MLP's (it lost 1.4 ms a step on 2026-11-28 and compiles in
  # 30 s a function against 9), profiled (the kernel table is in the log, the traces in profile.tgz when under
  # the tool's 16 MB a file): the first and third targets.
  kernels="--routing pallas --norms pallas --mlp xla"
  step "batch 1 and 8: decoder step (alone, queued, looped) and encoder canvas, every kernel"
  timeout "$(limit 240)" "${bench[@]}" --no-generate --batch 1 8 $kernels --repeats 3 --profile /tmp/profile \
    --json "$OUT/steps.json" > "$OUT/steps.log" 2>&1
  logs=steps
  (cd /tmp/profile 2>/dev/null && tar czf /tmp/profile.tgz . && [ "$(stat -c %s /tmp/profile.tgz)" -lt 16000000 ] \
    && cp /tmp/profile.tgz "$OUT/") || echo "profile traces not brought back" >> "$OUT/progress.log"
  # A measured point is one log line of JSON with a "decoder_ms"; without any, a fallback times the XLA twins.
  if ! grep -q '"decoder_ms"' "$OUT/steps.log"; then
    kernels="--routing xla --norms xla --mlp xla"
    step "fallback: batch 1 with XLA routing, norms and MLP"
    timeout "$(limit 200)" "${bench[@]}" --no-generate --batch 1 $kernels --repeats 3 > "$OUT/fallback.log" 2>&1
    logs="$logs fallback"
  fi

  # The rest of the call (~250 s): 2026-11-28's 141 s with the MLP kernel did not reach the first timing.
  step "6 layers, whole generate loop, ours against transformers (static cache + torch.compile)"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout "$(limit 300)" "${bench[@]}" --layers 6 --batch 1 $kernels \
    --with-transformers --repeats 2 --json "$OUT/transformers.json" > "$OUT/transformers.log" 2>&1
  logs="$logs transformers"
fi

step done
cat "$OUT/progress.log"
[ -f "$OUT/gpu_check.jsonl" ] && { echo "--- gpu_check"; cat "$OUT/gpu_check.jsonl"; }
for log in $logs; do
  echo "--- $log"; grep -v "^\s*$" "$OUT/$log.log" | grep -v "^.*point {" | tail -30
done
