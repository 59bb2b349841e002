#!/usr/bin/env bash
# Deletes the slice. Checkpoints in a GCS MODEL_DIR survive; anything on the hosts' disks does not.
set -euo pipefail
# shellcheck source=config.sh source-path=SCRIPTDIR
source "$(dirname "$0")/config.sh"
gtpu delete "$TPU_NAME" --quiet
