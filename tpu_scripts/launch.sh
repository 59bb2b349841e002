#!/usr/bin/env bash
# Starts geex-train on every host of the slice (one process per host, in the background, logging
# to ~/$LOG_FILE, its pid in ~/$PID_FILE). jax.distributed.initialize() discovers the slice by
# itself (--distributed). Arguments are passed to geex-train, e.g.:
#   bash tpu_scripts/launch.sh --gin_file=models/13b.gin --gin_file=runs/pretrain.gin \
#     --gin.MODEL_DIR="'gs://my-bucket/geex-13b'" --gin.CORPUS_DIR="'/mnt/corpus'" \
#     --gin.TOKENIZER_DIR="'/mnt/codegeex_tokenizer'" --gin.train.mesh_shape="(1, -1, 8)"
# MODEL_DIR must be visible to every host (a GCS bucket or a shared filesystem); so must the corpus.
# Refuses (exit 1) on a host where the trainer it started is still running: stop.sh first.
# Relaunching the same command resumes from the latest checkpoint.
set -euo pipefail
# shellcheck source=config.sh source-path=SCRIPTDIR
source "$(dirname "$0")/config.sh"
[[ $# -gt 0 ]] || { echo "usage: $0 GEEX_TRAIN_ARGS..." >&2; exit 2; }
args=$(printf '%q ' "$@")
on_all_workers "$remote_training_fn
cd ~/$REMOTE_DIR && . .venv/bin/activate || exit 1
if training; then echo \"\$(hostname): already training, pid \$pid (stop.sh first)\" >&2; exit 1; fi
nohup python -m geex_jax.training --distributed $args > ~/$LOG_FILE 2>&1 < /dev/null &
echo \$! > ~/$PID_FILE
echo \"\$(hostname): started pid \$!, log ~/$LOG_FILE\""
