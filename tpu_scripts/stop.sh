#!/usr/bin/env bash
# Stops training on every host with SIGTERM: each process saves a checkpoint at the same step
# (the preemption sync point) and exits; launch.sh resumes from it. Waits up to STOP_TIMEOUT
# seconds (default 600; 0 = don't wait) for the processes to exit; exit 1 if one is still running.
set -euo pipefail
# shellcheck source=config.sh source-path=SCRIPTDIR
source "$(dirname "$0")/config.sh"
: "${STOP_TIMEOUT:=600}"
[[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || { echo "$0: STOP_TIMEOUT must be a number of seconds" >&2; exit 2; }
if [[ $STOP_TIMEOUT == 0 ]]; then
  timed_out="exit 0"
else
  timed_out="echo \"\$(hostname): pid \$pid still running after ${STOP_TIMEOUT}s (saving? see ~/$LOG_FILE)\" >&2
exit 1"
fi
on_all_workers "$remote_training_fn
if ! training; then echo \"\$(hostname): not training\"; rm -f ~/$PID_FILE; exit 0; fi
kill -TERM \"\$pid\"
echo \"\$(hostname): SIGTERM sent to pid \$pid\"
for ((i = 0; i < $STOP_TIMEOUT; i++)); do
  training || { echo \"\$(hostname): stopped\"; rm -f ~/$PID_FILE; exit 0; }
  sleep 1
done
$timed_out"
