#!/usr/bin/env bash
# Streams the training log: worker 0 by default (it prints the progress bar and metrics),
# WORKER=all for every host (prefixed by gcloud with the worker's address).
set -euo pipefail
# shellcheck source=config.sh source-path=SCRIPTDIR
source "$(dirname "$0")/config.sh"
gtpu ssh "$TPU_NAME" --worker="${WORKER:-0}" --command="tail -n 100 -F ~/$LOG_FILE"
