#!/usr/bin/env bash
# Every GPU figure in BENCHMARKS.md, in one run on one card (the repo root as working dir).
#   bash bench/gpu.sh [OUT_DIR] [PART...]      PART: kernel sample train (default: all three)
# Assumes jax with CUDA, flax, optax, orbax-checkpoint are installed (gin-config for the trainer).
#   kernel  bench/decode_matmul.py: the decode kernel's tilings vs XLA on the 13B linears
#           (writes OUT/tilings.json, which `sample` then uses)
#   sample  bench/sample.py --gpu: 13B decode, int8 and bf16, batch 1 and 64,
#           with a perfetto trace of each batch-1 decode summarised by bench/trace_summary.py
#   train   bench/train.py: the 1.3b and 2.7b training-step sweep (attention x remat x scan x batch)
set -uo pipefail
out=${1:-${OUT:-/tmp/geex_gpu}}; mkdir -p "$out"; shift || true
parts=${*:-kernel sample train}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$out/card.txt"
case "$(nvidia-smi --query-gpu=name --format=csv,noheader)" in
  *H200*) bw=4.8e12 ;; *H100*) bw=3.35e12 ;; *A100*) bw=2.04e12 ;; *) bw=3.35e12 ;;
esac
tilings=()
if [[ " $parts " == *" kernel "* ]]; then
  timeout 170 python3 bench/decode_matmul.py --peak_bw $bw --budget_s 100 --out "$out/tilings.json" \
    2>&1 | tee "$out/kernel.md"
fi
[[ -s "$out/tilings.json" ]] && tilings=(--tilings "$out/tilings.json")
if [[ " $parts " == *" sample "* ]]; then
  traces=/tmp/geex_traces; rm -rf $traces
  # int8 through the sampler's default ("auto": the kernel at batch 1) and through XLA, then bf16
  # (XLA) plus two XLA-option variants: the dot merger's default limit (the old baseline), and
  # the while loop captured as a CUDA graph (no host round trip per token, see the trace); and
  # 8 decode steps per loop iteration (an inner loop the host can queue ahead).
  # 64-token prompt, 64 greedy tokens. Ten 13B configurations: ~6-7 min of the 15-min device budget.
  timeout 420 python3 bench/sample.py --gpu --preset 13b --dtype int8 bf16 --peak_bw $bw \
    --gpu_new_tokens 64 --matmul auto xla "${tilings[@]}" --trace $traces --steps_per_loop 1 8 \
    --xla_options xla_gpu_dot_merger_threshold_mb=32 \
    "xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" \
    2>&1 | tee "$out/sample.md"
  for t in $traces/*/plugins/profile/*/perfetto_trace.json.gz; do
    [[ -e $t ]] || continue
    label=$(basename "$(dirname "$(dirname "$(dirname "$(dirname "$t")")")")")
    cp "$t" "$out/trace_$label.json.gz"
    echo "== $label" | tee -a "$out/sample.md"
    python3 bench/trace_summary.py "$t" --steps 63 --top 20 2>&1 | tee -a "$out/sample.md"
  done
fi
if [[ " $parts " == *" train "* ]]; then
  # Training step sweep, 2048 tokens, bf16 compute, fp32 master weights: attention {cudnn, xla}
  # x remat {none, minimal, full} x scan {true, false} x batch {8, 16} per preset, one variant
  # at a time in this priority order; a variant whose compiled memory exceeds the card is
  # skipped (OOM row), and none starts after the preset's time budget (skipped rows):
  # TRAIN_BUDGET_S (default 480 s, 45% for 1.3b) fits one 10-minute device call.
  # GEEX_TOY=1: the same commands at a 2-layer toy shape on the CPU (tests/test_bench_train.py);
  # TRAIN_PRESETS: a subset of the presets.
  budget=${TRAIN_BUDGET_S:-480}
  order=()
  for scan in true false; do
    order+=("cudnn:full:$scan:8" "xla:full:$scan:8" "cudnn:minimal:$scan:8" "cudnn:none:$scan:8")
    order+=("cudnn:minimal:$scan:16" "cudnn:full:$scan:16" "cudnn:none:$scan:16")
    order+=("xla:minimal:$scan:8" "xla:none:$scan:8")
    order+=("xla:full:$scan:16" "xla:minimal:$scan:16" "xla:none:$scan:16")
  done
  if [[ -n "${GEEX_TOY:-}" ]]; then
    sizes=(--toy --seq_len 128 --steps 1 --rounds 1 --warmup 1 --peak_flops 1e11)
    budgets=(0 0)
  else
    sizes=(--seq_len 2048 --steps 3 --rounds 1 --warmup 1)
    budgets=($((budget * 45 / 100)) $((budget * 55 / 100)))
  fi
  i=0
  for preset in ${TRAIN_PRESETS:-1.3b 2.7b}; do
    b=${budgets[$i]}; i=$((i + 1))
    timeout $((b + 240)) python3 bench/train.py --preset $preset --dtype bf16 "${sizes[@]}" \
      --sequential --budget_s "$b" --loss_chunk_size "${TRAIN_LOSS_CHUNK:-0}" \
      --variants "${order[@]}" --json "$out/train.jsonl" 2>&1 | tee -a "$out/train.md"
  done
fi
