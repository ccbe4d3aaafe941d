#!/usr/bin/env bash
# CI step: build the CPU image and smoke-test it (containers/build.sh cpu, containers/smoke.sh cpu).
#
#   CI=true containers/ci.sh       # as root; .ci/run calls it after the unit tests
#
# Installs buildah, podman, runc, uidmap and debootstrap with apt-get when they are missing (only in
# CI, CI=true) and skips, with one line saying why, only where this machine cannot run the build:
# not Linux, not root, tools missing and no apt-get (or outside CI), no mount namespaces, no overlay
# file system, too little free disk. Any other failure fails the step.
#
# The build uses a container storage of its own under TMPDIR (CONTAINERS_STORAGE_CONF): every run
# starts from nothing (no stale layer can make it pass), parallel runs on one machine cannot tag over
# each other, and nothing stays behind. The smoke test's host training needs scrcl-cli with torch
# on PATH (.ci/run's virtualenv); it trains on the example packaged with scrcl-cli.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
MIN_FREE_MB="${MIN_FREE_MB:-6000}"

skip() { echo "SKIP container image build: $*"; exit 0; }
log() { printf '[ci.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

[[ "$(uname -s)" == Linux ]] || skip "not Linux ($(uname -s))"
(( EUID == 0 )) || skip "not root (uid $EUID): installing the tools, debootstrap and the daemon-less build here need root"
missing=()
for tool in buildah podman runc debootstrap newuidmap; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if (( ${#missing[@]} )); then
    [[ "${CI:-}" == true ]] || skip "${missing[*]} missing and CI=true not set: not installing system packages outside CI"
    command -v apt-get >/dev/null || skip "${missing[*]} missing and no apt-get to install them"
fi
unshare --mount --pid --fork true 2>/dev/null || skip "cannot create mount and PID namespaces (an unprivileged container?)"
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || skip "no overlay file system in this kernel"
tmp_root="${TMPDIR:-/tmp}"
free_mb="$(df -Pm "$tmp_root" | awk 'NR == 2 {print $4}')"
(( free_mb >= MIN_FREE_MB )) || skip "$free_mb MB free under $tmp_root, the build needs $MIN_FREE_MB"

t0=$SECONDS
if (( ${#missing[@]} )); then
    log "installing buildah podman runc uidmap debootstrap (missing: ${missing[*]})"
    apt_opts=(-q -o Acquire::Retries=3 -o DPkg::Lock::Timeout=300)
    apt-get "${apt_opts[@]}" update >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y --no-install-recommends \
        buildah podman runc uidmap debootstrap >/dev/null
    log "tools installed in $((SECONDS - t0)) s: $(buildah --version), $(podman --version)"
fi

store="$(mktemp -d "$tmp_root/scrcl-ci-images.XXXXXX")"
cat >"$store/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$store/graph"
runroot = "$store/run"
EOF
cat >"$store/containers.conf" <<EOF
[engine]
tmp_dir = "$store/libpod"
EOF
export CONTAINERS_STORAGE_CONF="$store/storage.conf" CONTAINERS_CONF="$store/containers.conf"
# shellcheck source=containers/rootfs_guards.sh
source "$here/rootfs_guards.sh"
cleanup() {
    buildah rm --all >/dev/null 2>&1 || true
    podman rmi --all --force >/dev/null 2>&1 || true
    # the overlay driver mounts its own folder privately; remove nothing that is still mounted
    if unmount_under "$store"; then rm -rf "$store"; else log "left $store behind (still mounted)"; fi
}
trap cleanup EXIT

t1=$SECONDS
SAVE=0 BUILD_DIR="$store/build" "$here/build.sh" cpu
log "image built in $((SECONDS - t1)) s"
t2=$SECONDS
SMOKE_DATA="$repo/scrcl_cli/data/pbmc68k_reduced_700.h5ad" "$here/smoke.sh" cpu
log "smoke test in $((SECONDS - t2)) s; container image step $((SECONDS - t0)) s in all"
