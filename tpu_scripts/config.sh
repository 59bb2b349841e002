# Shared settings of the TPU scripts. Override any of them in the environment:
#   TPU_NAME=geex-v4-512 ACCELERATOR_TYPE=v4-512 ZONE=us-central2-b bash tpu_scripts/create.sh
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

gtpu() {  # gcloud compute tpus tpu-vm ... with the project and zone filled in
  gcloud compute tpus tpu-vm "$@" --project="$PROJECT" --zone="$ZONE"
}

on_all_workers() {  # runs a shell command on every host of the slice, in parallel
  gtpu ssh "$TPU_NAME" --worker=all --command="$1"
}
