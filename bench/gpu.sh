#!/usr/bin/env bash
# Every GPU figure in BENCHMARKS.md, in one run on one card (the repo root as working dir).
#   bash bench/gpu.sh [OUT_DIR]
# Assumes jax with CUDA, flax, optax, orbax-checkpoint are installed (gin-config for the trainer).
set -uo pipefail
out=${1:-${OUT:-/tmp/geex_gpu}}; mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/card.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" | tee -a "$out/card.txt"
case "$(nvidia-smi --query-gpu=name --format=csv,noheader)" in
  *H200*) bw=4.8e12 ;; *H100*) bw=3.35e12 ;; *A100*) bw=2.04e12 ;; *) bw=3.35e12 ;;
esac
# Sampling: 13B random weights, bf16 and int8, batch 1 ms/token + HBM fraction, batch 64 tokens/s.
timeout 220 python3 bench/sample.py --gpu --preset 13b --dtype bf16 int8 --peak_bw $bw \
  --gpu_new_tokens 64 2>&1 | tee "$out/sample.md"
# Training step: 1.3b and 2.7b at 2048 tokens, bf16 compute, fp32 master weights, cuDNN attention.
for preset in 1.3b 2.7b; do
  timeout 130 python3 bench/train.py --preset $preset --seq_len 2048 --batch 8 --dtype bf16 \
    --attention dot_product --remat full --steps 5 --warmup 2 --json "$out/train.jsonl" 2>&1 \
    | tee -a "$out/train.md"
done
