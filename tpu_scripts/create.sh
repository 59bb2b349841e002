#!/usr/bin/env bash
# Creates the TPU VM slice (all hosts). Spot capacity: SPOT=1 (preemptible: geex-train saves a
# checkpoint on SIGTERM and resumes from it on the next launch).
set -euo pipefail
# shellcheck source=config.sh source-path=SCRIPTDIR
source "$(dirname "$0")/config.sh"
extra=()
[[ "${SPOT:-0}" == 1 ]] && extra+=(--spot)
gtpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
  ${extra[@]+"${extra[@]}"}  # (an empty array is "unbound" under set -u in bash < 4.4)
gtpu describe "$TPU_NAME" --format='value(state,acceleratorType)'
