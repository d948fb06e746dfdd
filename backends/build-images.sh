#!/usr/bin/env bash
# Build local Docker images of Redis and etcd from the server binaries installed on this
# machine, for hosts that have a Docker engine but no reachable container registry.
# Each image is a bare rootfs (the binary, the shared libraries `ldd` lists, the dynamic
# loader) imported with `docker import`; the configs in backends/ are mounted at run time.
# Like the official images, the server binary is on PATH and is named by the command.
#
#   backends/build-images.sh            # builds dcoord/redis:local and dcoord/etcd:local
# Needs: docker (an engine answering), redis-server + redis-tools, etcd-server + etcd-client.
#   REDIS_IMAGE=x ETCD_IMAGE=y backends/build-images.sh
set -euo pipefail

REDIS_IMAGE=${REDIS_IMAGE:-dcoord/redis:local}
ETCD_IMAGE=${ETCD_IMAGE:-dcoord/etcd:local}

build() {  # build IMAGE BINARY...
    local image=$1; shift
    local root
    root=$(mktemp -d)
    trap 'rm -rf "$root"' RETURN
    mkdir -p "$root"/{usr/local/bin,data,tmp,etc} && chmod 1777 "$root/tmp"
    echo 'root:x:0:0:root:/data:/bin/false' > "$root/etc/passwd"
    echo 'root:x:0:' > "$root/etc/group"
    local bin lib
    for bin in "$@"; do
        cp -L "$bin" "$root/usr/local/bin/"
        # Every absolute path ldd prints (libraries and the loader) is copied to the same path.
        for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
    done
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/bin' \
        --change 'WORKDIR /data' \
        - "$image" >/dev/null
    echo "built $image from $*"
}

# The CLIs go in too: docker-compose.yml's health checks use them. So do sh and cp: a
# sentinel (compose profile sentinel) starts on a writable copy of its configuration.
build "$REDIS_IMAGE" "$(command -v redis-server)" "$(command -v redis-cli)" \
    "$(command -v sh)" "$(command -v cp)"
build "$ETCD_IMAGE" "$(command -v etcd)" "$(command -v etcdctl)"
