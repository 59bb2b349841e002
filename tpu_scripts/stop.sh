#!/usr/bin/env bash
# Stops training on every host with SIGTERM: each process saves a checkpoint at the same step
# (the preemption sync point) and exits; launch.sh resumes from it.
set -euo pipefail
source "$(dirname "$0")/config.sh"
on_all_workers "pkill -TERM -f '[g]eex_jax.train' || true"
