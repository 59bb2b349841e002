# Shared settings of the TPU scripts. Override any of them in the environment:
#   TPU_NAME=geex-v4-512 ACCELERATOR_TYPE=v4-512 ZONE=us-central2-b bash tpu_scripts/create.sh
# shellcheck shell=bash
: "${PROJECT:=$(gcloud config get-value project 2>/dev/null)}"
: "${ZONE:=us-central2-b}"
: "${TPU_NAME:=geex-tpu}"
: "${ACCELERATOR_TYPE:=v4-32}"                 # v4-32 = 16 chips on 4 hosts
: "${RUNTIME_VERSION:=tpu-ubuntu2204-base}"
: "${REPO_URL:=}"                              # git URL to clone; empty = copy this checkout
: "${REPO_REF:=main}"
: "${REMOTE_DIR:=geex-jax}"                    # on each worker, relative to $HOME
: "${JAX_VERSION:=0.10.2}"
: "${LOG_FILE:=geex-train.log}"                # on each worker, in $HOME
: "${PID_FILE:=geex-train.pid}"                # on each worker, in $HOME: pid of the running trainer

gtpu() {  # gcloud compute tpus tpu-vm ... with the project and zone filled in
  gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE"
}

on_all_workers() {  # runs a shell command on every host of the slice, in parallel
  gtpu ssh "$TPU_NAME" --worker=all --command="$1"
}

# Shell code for the workers: defines `training`, which succeeds (and sets $pid) while the trainer
# that launch.sh started on this host runs. It trusts ~/$PID_FILE only if that pid is alive and
# still a geex_jax.training process (not a zombie, not a recycled pid). No pgrep: a pattern would also
# match the `bash -c` that sshd runs, whose command line holds the whole remote command.
# shellcheck disable=SC2034  # used by the scripts that source this file
remote_training_fn="training() {
  pid=\$(cat ~/$PID_FILE 2>/dev/null) && [[ \"\$pid\" =~ ^[0-9]+\$ ]] && kill -0 \"\$pid\" 2>/dev/null &&
    grep -qaF geex_jax.training \"/proc/\$pid/cmdline\" 2>/dev/null
}"
