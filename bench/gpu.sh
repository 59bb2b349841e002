#!/usr/bin/env bash
# Every GPU figure in BENCHMARKS.md, in one run on one card (the repo root as working dir).
#   bash bench/gpu.sh [OUT_DIR] [PART...]      PART: kernel sample train (default: all three)
# Assumes jax with CUDA, flax, optax, orbax-checkpoint are installed (gin-config for the trainer).
#   kernel  bench/decode_matmul.py: the decode kernel's tilings vs XLA on the 13B linears
#           (writes OUT/tilings.json, which `sample` then uses)
#   sample  bench/sample.py --gpu: 13B decode, int8 and bf16, batch 1 and 64,
#           with a perfetto trace of each batch-1 decode summarised by bench/trace_summary.py
#   train   bench/train.py: 1.3b and 2.7b training steps
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
  # Training step: 1.3b and 2.7b at 2048 tokens, bf16 compute, fp32 master weights, cuDNN attention.
  for preset in 1.3b 2.7b; do
    timeout 130 python3 bench/train.py --preset $preset --seq_len 2048 --batch 8 --dtype bf16 \
      --attention dot_product --remat full --steps 5 --warmup 2 --json "$out/train.jsonl" 2>&1 \
      | tee -a "$out/train.md"
  done
fi
