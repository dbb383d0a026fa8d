#!/usr/bin/env bash
# Every GPU check in one call on a lent GPU machine (the device tool's `run`, with `carry: [".whl"]` fetched by
# ../shared/gpu/fetch_wheels.sh): install the carried wheels, `pytest -m gpu`, bench/gpu_mfu.py with torch.compile
# off and on, and a short real training run (DeepSpeed through launch/torchrun.sh, one GPU, bf16, token drop 0.5,
# SDPA flash) whose metrics carry the peak memory and the share of time spent waiting for data. Logs and results go to $OUT (8 files at most come back).
#   bench/gpu_check.sh                          # on the GPU machine
#   DEVICE=cpu MODEL=EVA02-Ti-8-64 BATCH=8 SYNTH_SIZE=64 STEPS=4 OUT=/tmp/o bench/gpu_check.sh   # CPU smoke run
set -uo pipefail
OUT=${OUT:?set OUT to a folder for the logs}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-EVA02-B-16}
BATCH=${BATCH:-256}           # gpu_mfu's per-GPU batch
TRAIN_BATCH=${TRAIN_BATCH:-128}
STEPS=${STEPS:-30}            # training steps
SYNTH_SIZE=${SYNTH_SIZE:-224}
export PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 TORCH_EXTENSIONS_DIR=/tmp/torch_ext OMP_NUM_THREADS=4
mkdir -p "$OUT" /tmp/bin
if [ -d .whl ] && [ "$DEVICE" = cuda ]; then  # the wheels are for the GPU machine's Python 3.12
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl &&
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
    .whl/deepspeed-*.tar.gz || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
# launch/torchrun.sh calls `python` and `torchrun`: give both names to this python3
command -v python >/dev/null || ln -sf "$(command -v python3)" /tmp/bin/python
command -v torchrun >/dev/null || printf '#!/bin/sh\nexec python3 -m torch.distributed.run "$@"\n' > /tmp/bin/torchrun
chmod +x /tmp/bin/* 2>/dev/null; export PATH=/tmp/bin:$PATH

{ date -u; nvidia-smi 2>&1 | head -15
  python3 -c "import torch, open_clip, deepspeed, evaclip; print('torch', torch.__version__, 'deepspeed', \
deepspeed.__version__, 'open_clip', open_clip.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
status=0
step() { echo "== $1 ($(date -u +%T))"; }

step "pytest -m gpu"
timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_models.py \
  2>&1 | tee "$OUT/pytest_gpu.log" || status=1

if [ "${SKIP_MFU:-0}" = 0 ]; then
  step "gpu_mfu: $MODEL batch $BATCH, drop 0 / 0.5, compile off / towers / step"
  timeout "${MFU_TIMEOUT:-300}" python3 bench/gpu_mfu.py --model "$MODEL" --batch "$BATCH" --steps 10 \
    --device "$DEVICE" --out "$OUT/gpu_mfu.json" 2>&1 | grep -v "^W[0-9]" | tee "$OUT/gpu_mfu.log" || status=1
fi

python3 -m evaclip.cli data synth --out /tmp/synth --shards 8 --per-shard 256 --image-size "$SYNTH_SIZE" \
  > /dev/null || status=1
for engine in ${ENGINES:-deepspeed}; do  # `ENGINES="deepspeed torch"` also runs the plain torch engine beside it
  extra=(); [ "$engine" = torch ] && extra=(engine.zero_stage=0 engine.deepspeed_overlay=)
  step "training run: $MODEL, $engine engine, bf16, token drop 0.5, sdpa_flash, $STEPS steps of $TRAIN_BATCH"
  NPROC=1 timeout "${TRAIN_TIMEOUT:-150}" launch/torchrun.sh launch/experiments/eva02_clip_b16.toml \
    engine.kind="$engine" run.device="$DEVICE" run.name="gpu_$engine" run.output_dir=/tmp/runs run.steps="$STEPS" \
    schedule.warmup_steps=5 model.name="$MODEL" model.vision.init= model.text.init= model.vision.patch_dropout=0.5 \
    model.vision.attn_impl=sdpa_flash model.text.attn_impl=sdpa_flash engine.precision=bf16 \
    data.recipe='"/tmp/synth/recipe.toml"' data.root=/tmp/synth data.micro_batch_size="$TRAIN_BATCH" \
    data.workers="${WORKERS:-8}" eval.suite=quick eval.datasets_root=/tmp/synth/zeroshot eval.every_steps=0 \
    checkpoint.every_steps=1000 log.every_steps=5 log.progress=false spike.enabled=false "${extra[@]}" \
    2>&1 | tee "$OUT/train_$engine.log" || status=1
  cp "/tmp/runs/gpu_$engine/metrics.jsonl" "$OUT/train_metrics_$engine.jsonl" 2>/dev/null || status=1
  # the plan of the same run, to set beside its measured peak (sys/max_mem_allocated_gib in the metrics)
  python3 -m evaclip.cli plan launch/experiments/eva02_clip_b16.toml --gpu "${PLAN_GPU:-h200}" --nodes 1 \
    --gpus-per-node 1 --json engine.kind="$engine" run.steps="$STEPS" schedule.warmup_steps=5 model.name="$MODEL" \
    model.vision.init= model.text.init= model.vision.patch_dropout=0.5 model.vision.attn_impl=sdpa_flash \
    model.text.attn_impl=sdpa_flash engine.precision=bf16 data.recipe='"/tmp/synth/recipe.toml"' data.root=/tmp/synth \
    data.micro_batch_size="$TRAIN_BATCH" "${extra[@]}" > "$OUT/plan_$engine.json" || status=1
done
echo "== done ($(date -u +%T)), status $status"
exit $status
