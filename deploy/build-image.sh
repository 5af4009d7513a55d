#!/usr/bin/env bash
# Builds the vllm-edge image without pulling anything: the release binary built here,
# its root file system laid out by deploy/rootfs.sh, and an image made of it alone
# (deploy/Containerfile.rootfs) by podman (installed from Debian when missing).
# Usage: deploy/build-image.sh [TAG]   (default localhost/vllm-edge:dev)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
tag=${1:-localhost/vllm-edge:dev}
if ! command -v podman >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq podman >/dev/null
fi
cargo build --release --locked
root="$target_dir/image-rootfs"
deploy/rootfs.sh "$target_dir/release/vllm-edge" "$root"
podman build -f deploy/Containerfile.rootfs -t "$tag" "$root"
echo "built $tag" >&2
