#!/usr/bin/env bash
# One GPU session, end to end, on a bare CUDA machine that already has torch, triton and transformers
# (no network, no pip install): every stage is time-boxed so the whole run fits one ~9.5-minute lease,
# and every stage packs its own results under $OUT as soon as it ends (a later overrun loses nothing).
#
#   OUT=/tmp/gpu-out bash scripts/gpu_session.sh            # needs .devwork/data (see below)
#
# Stages (seconds from the start; GPU work never overlaps a timed benchmark):
#   build    CUDA+C++ extension in place (CPU, in the background from t=0)
#   target   pretrain the tiny-code target on the GPU (cosine schedule fitted to TARGET_FIT_S)
#   tests    kernel tests on CUDA (Triton, CUDA and C++ backends vs the references)
#   head     export the target, dump its features, train the EAGLE-2 head on the GPU
#   bench    per-op microbenchmarks (pytest-benchmark JSON), then the decoding loop on a random
#            Llama-2-7B-shaped pair and on the new tiny-code pair
# .devwork/data is the tokenised corpus of the machine that prepares the run (so the model is trained
# on that machine's standard library with the committed tokenizer):
#   python -c "from eagle.train.pretrain import prepare_data as p; p('.devwork/data',
#              tokenizer_from='eagle/assets/tiny-code/target')"
set -u
OUT=${OUT:-/tmp/gpu-out}
W=${W:-/tmp/ew}
TARGET_FIT_S=${TARGET_FIT_S:-90}
mkdir -p "$OUT" "$W"
T0=$(date +%s)
el() { echo $(($(date +%s) - T0)); }
log() { echo "[$(el)s] $*" | tee -a "$OUT/log.txt"; }
pack() { # pack NAME FILES... : one tar.gz per stage (the lease returns at most 8 files)
    local name=$1; shift
    tar czf "$OUT/$name.tgz" --ignore-failed-read "$@" 2>/dev/null
    log "packed $name ($(du -h "$OUT/$name.tgz" | cut -f1))"
}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false EAGLE_TEST_GPU=1
command -v nvcc >/dev/null || export PATH=/usr/local/cuda/bin:$PATH

log "start on $(nvidia-smi -L | head -1)"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/log.txt"

# ---- build (CPU, background) ----------------------------------------------------------------------
(TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=14 timeout 300 python3 setup.py build_ext --inplace >"$W/build.log" 2>&1
    echo "build rc=$?" >>"$W/build.log") &
BUILD=$!

# ---- target pretraining (GPU) ---------------------------------------------------------------------
rm -rf "$W/target" && cp -r .devwork/data "$W/target"
log "target training starts"
timeout $((TARGET_FIT_S + 40)) python3 -m eagle.train.pretrain --out "$W/target" --device cuda \
    --batch-size 64 --lr 2e-3 --warmup-tokens 3000000 --max-tokens 80000000 \
    --fit-schedule-s "$TARGET_FIT_S" --eval-every-tokens 4000000 --checkpoint-every-s 100000 \
    >"$W/target.log" 2>&1
log "target training rc=$? $(tail -1 "$W/target.log")"

wait $BUILD
log "$(tail -1 "$W/build.log")"
python3 -c "import eagle_kernels as k; from eagle_kernels._ext import status; print(status())" >>"$W/build.log" 2>&1
pack build "$W/build.log"

# ---- export (CPU) in the background, kernel tests (GPU) ------------------------------------------
(timeout 150 python3 -m eagle.train.pretrain --out "$W/target" --export "$W/export/target" --from-best \
    --finished >"$W/export.log" 2>&1; echo "export rc=$?" >>"$W/export.log") &
EXPORT=$!
log "kernel tests start"
timeout -s INT 120 python3 -m pytest tests/kernels tests/test_extension.py --device cuda -q -n 8 \
    -p no:cacheprovider --timeout=60 --tb=short -rfE --junitxml="$W/tests.xml" >"$W/tests.log" 2>&1
log "kernel tests rc=$? $(tail -1 "$W/tests.log")"
pack tests "$W/tests.log" "$W/tests.xml"
wait $EXPORT
log "$(tail -1 "$W/export.log")"

# ---- draft head (GPU) -----------------------------------------------------------------------------
if [ -f "$W/export/target/model.safetensors" ]; then
    log "features start"
    EAGLE_KERNELS_BACKEND=torch timeout 50 python3 -m eagle.train.features --target "$W/export/target" \
        --tokens "$W/target/train.npy" --out "$W/features" --source corpus --seq-len 256 \
        --max-tokens 4000000 --batch 64 --device cuda --quiet >"$W/features.log" 2>&1
    log "features rc=$? $(tail -1 "$W/features.log")"
    EAGLE_KERNELS_BACKEND=torch timeout 90 python3 -m eagle.train.head --target "$W/export/target" \
        --data "$W/features" --out "$W/head" --epochs 4 --batch 32 --lr 1.5e-3 --device cuda \
        --save-dtype float16 >"$W/head.log" 2>&1
    log "head rc=$? $(tail -1 "$W/head.log")"
fi
(cd "$W" && tar czf "$OUT/target.tgz" export/target target/metrics.jsonl target.log export.log head features.log head.log 2>/dev/null)
log "packed target ($(du -h "$OUT/target.tgz" | cut -f1))"

# ---- microbenchmarks and the loop (GPU, nothing else running) -------------------------------------
log "microbenchmarks start"
timeout -s INT 100 python3 -m pytest bench -q -p no:cacheprovider --benchmark-only \
    --benchmark-json="$W/bench_ops.json" --benchmark-min-rounds=10 --benchmark-max-time=0.2 \
    --benchmark-warmup=on --benchmark-columns=min,median,mean,rounds >"$W/bench_ops.log" 2>&1
log "microbenchmarks rc=$? $(tail -1 "$W/bench_ops.log")"
pack bench "$W/bench_ops.json" "$W/bench_ops.log"
log "loop bench (random 7B) start"
timeout 45 python3 bench/bench_loop.py --random 7b --device cuda --trees dynamic static chain \
    --batch 1 4 --temperature 0 --new-tokens 32 --repeats 2 >"$W/loop7b.log" 2>&1
log "loop 7b rc=$?"
if [ -f "$W/head/config.json" ]; then
    timeout 30 python3 bench/bench_loop.py --target "$W/export/target" --draft "$W/head" --device cuda \
        --dtype float32 --batch 1 4 --temperature 0 1 --new-tokens 64 --repeats 2 >"$W/loop_tiny.log" 2>&1
    log "loop tiny rc=$?"
fi
cp bench/results/loop_*H*.json "$W/" 2>/dev/null
pack loop "$W"/loop*.log "$W"/loop_*.json
log "done"
