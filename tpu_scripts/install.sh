#!/usr/bin/env bash
# Puts the code on every host (this checkout as it is, or REPO_URL at REPO_REF) and installs it
# (Python 3.11 venv, pinned deps, jax[tpu]).
# Training needs neither torch nor TensorFlow: only the package's own dependencies are installed,
# constrained to the versions pinned in requirements.txt. Refuses on a host that is training
# (it replaces ~/$REMOTE_DIR): stop.sh first.
set -euo pipefail
# shellcheck source=config.sh source-path=SCRIPTDIR
source "$(dirname "$0")/config.sh"
repo_root="$(cd "$(dirname "$0")/.." && pwd)"
if [[ -z "$REPO_URL" ]]; then
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  # The working tree's tracked and untracked-but-not-ignored files (deleted ones left out).
  git -C "$repo_root" ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do if [[ -e "$repo_root/$f" ]]; then printf '%s\0' "$f"; fi; done \
    | tar -C "$repo_root" --null -T - -czf "$tmp/geex-jax.tar.gz"
  gtpu scp "$tmp/geex-jax.tar.gz" "$TPU_NAME:~/geex-jax.tar.gz" --worker=all
  fetch="rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/geex-jax.tar.gz -C ~/$REMOTE_DIR"
else
  fetch="rm -rf ~/$REMOTE_DIR && git clone --depth 1 -b $REPO_REF $REPO_URL ~/$REMOTE_DIR"
fi
on_all_workers "$remote_training_fn
if training; then echo \"\$(hostname): training, pid \$pid (stop.sh first)\" >&2; exit 1; fi
set -e; $fetch; cd ~/$REMOTE_DIR
  sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv >/dev/null
  python3.11 -m venv .venv && . .venv/bin/activate && pip install -q --upgrade pip
  pip install -q -c requirements.txt -e . tensorboardX 'jax[tpu]==$JAX_VERSION' \
    -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
