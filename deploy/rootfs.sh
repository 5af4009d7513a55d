#!/usr/bin/env bash
# Lays out the root file system of the vllm-edge image in DIR: the binary, the C libraries
# it links (glibc and libgcc_s, as `ldd` lists them), the CA certificates (for https://
# backends and rediss://), /tmp (the upgrade socket), and the user it runs as (65532, no
# shell, no home). Nothing else: no shell, no package manager.
# Usage: deploy/rootfs.sh BINARY DIR
set -euo pipefail
bin=$1 dir=$2
rm -rf "$dir"
mkdir -p "$dir/usr/bin" "$dir/etc/vllm-edge" "$dir/tmp"
chmod 1777 "$dir/tmp"
install -m 0755 "$bin" "$dir/usr/bin/vllm-edge"
# Every shared object the binary needs, at the path the loader looks for it.
for lib in $(ldd "$bin" | grep -oE '/[^ ]+\.so[^ ]*'); do
  mkdir -p "$dir$(dirname "$lib")"
  cp -L "$lib" "$dir$lib"
done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$dir/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/"
fi
echo 'vllm-edge:x:65532:65532:vllm-edge:/nonexistent:/sbin/nologin' > "$dir/etc/passwd"
echo 'vllm-edge:x:65532:' > "$dir/etc/group"
# A configuration that runs as it is: compose and Kubernetes mount their own over it.
cat > "$dir/etc/vllm-edge/vllm-edge.yaml" <<'YAML'
listeners:
  - address: 0.0.0.0:8080
admin:
  address: 0.0.0.0:9090
backends:
  - url: http://vllm:8000
YAML
