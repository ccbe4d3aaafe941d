#!/usr/bin/env bash
# Build the scrcl-cli container images with buildah (no Docker daemon needed).
#
#   containers/build.sh cpu        # localhost/scrcl-cli:<version>            -> containers/out/scrcl-cli_<version>.tar
#   containers/build.sh train-cpu  # localhost/scrcl-cli:<version>-train-cpu  -> containers/out/scrcl-cli_<version>-train-cpu.tar
#   containers/build.sh cuda       # localhost/scrcl-cli:<version>-cuda       -> containers/out/scrcl-cli_<version>-cuda.tar
#   containers/build.sh base       # only make sure a Debian base image exists
#   containers/build.sh all        # cpu, train-cpu, then cuda
#
# Environment:
#   BASE            base image for `ARG BASE` (default docker.io/library/debian:bookworm-slim).
#                   If it is neither in local storage nor pullable (no registry reachable), a
#                   Debian bookworm minbase is bootstrapped with debootstrap from Debian's
#                   archive and committed as $LOCAL_BASE; that one is used instead.
#   LOCAL_BASE      name of the bootstrapped base (default localhost/debian-bookworm-minbase:12)
#                   Every image records the base it was built from in the labels
#                   org.opencontainers.image.base.name and .base.digest (the base's manifest digest).
#   TORCH_INDEX     where train-cpu gets the CPU build of torch (default the PyTorch CPU index,
#                   https://download.pytorch.org/whl/cpu): an http(s) URL is a package index, a local
#                   folder of wheels (or file:// URL) is mounted read-only at /mnt for that build and
#                   used as pip's --find-links. containers/lock.sh reads the same variable.
#   SOURCE_URL      org.opencontainers.image.source (default the public repository,
#                   https://github.com/scrcl-cli/scrcl-cli; the release passes its own)
#   DEBIAN_MIRROR   mirror for debootstrap (default: the one apt on this host uses, else deb.debian.org)
#   HOST_CA_BUNDLE  CA bundle handed to the pip steps as the build secret `pip_cert` (pip's PIP_CERT),
#                   so pip works behind a TLS-intercepting proxy (default
#                   /etc/ssl/certs/ca-certificates.crt if present; empty string: none). Secrets
#                   are mounted only during the RUN step and leave nothing in the image.
#   OUT_DIR         where the image archives go (default containers/out)
#   SAVE_FORMAT     docker-archive (default; what `apptainer build ... docker-archive://` and
#                   `Bootstrap: docker-archive` read) or oci-archive
#   SAVE=0          skip writing the archive
#   CONTEXT         build context (default: the repository root)
#   PULL_TIMEOUT    seconds to wait for a registry pull of BASE before bootstrapping (default 60)
#   MAX_ROOTFS_MB   refuse a bootstrapped root file system above this size (default 1024; see rootfs_guards.sh)
#
# Flags that work on a daemon-less build host with a hybrid cgroup setup: `--isolation chroot`
# (crun refuses "cgroups in hybrid mode") and `--network host`. `--format docker` because the OCI
# image format has no SHELL: buildah would drop `SHELL [... "-o", "pipefail" ...]` with a warning.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"

target="${1:-cpu}"
BASE="${BASE:-docker.io/library/debian:bookworm-slim}"
LOCAL_BASE="${LOCAL_BASE:-localhost/debian-bookworm-minbase:12}"
OUT_DIR="${OUT_DIR:-$here/out}"
SAVE_FORMAT="${SAVE_FORMAT:-docker-archive}"
SAVE="${SAVE:-1}"
PULL_TIMEOUT="${PULL_TIMEOUT:-60}"
BUILD_DIR="${BUILD_DIR:-$here/.build}"
if [[ -z "${HOST_CA_BUNDLE+x}" ]]; then
    HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
fi

# shellcheck source=containers/rootfs_guards.sh
source "$here/rootfs_guards.sh"
MAX_ROOTFS_MB="${MAX_ROOTFS_MB:-1024}"

log() { printf '[build.sh %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v buildah >/dev/null || die "buildah not found (Debian: apt-get install buildah podman runc uidmap debootstrap)"

version="$(sed -n 's/^__version__ *= *["'\'']\([^"'\'']*\)["'\''].*/\1/p' "$repo/scrcl_cli/_version.py")"
[[ -n "$version" ]] || die "could not read __version__ from scrcl_cli/_version.py"
revision="$(git -C "$repo" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
# A public URL, never a clone's remote (that may be a local path).
source_url="${SOURCE_URL:-https://github.com/scrcl-cli/scrcl-cli}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

# --- Debian base -----------------------------------------------------------------------------
debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
    local m
    m="$(grep -hoE '^URIs: *http[^ ]*/debian/?$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | sed 's/^URIs: *//')"
    [[ -n "$m" ]] || m="$(grep -hoE '^deb +http[^ ]*/debian/? ' /etc/apt/sources.list 2>/dev/null | head -1 | awk '{print $2}')"
    echo "${m:-http://deb.debian.org/debian}"
}

bootstrap_base() {
    command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
    local rootfs="$BUILD_DIR/rootfs-bookworm" mirror ctr mnt
    mirror="$(debian_mirror)"
    log "bootstrapping Debian bookworm minbase from $mirror into $rootfs"
    rm -rf "${rootfs:?}"
    mkdir -p "$BUILD_DIR"
    # Two attempts: a mirror hiccup (one failed download) should not fail a CI run.
    local attempt
    for attempt in 1 2; do
        if debootstrap --variant=minbase --components=main bookworm "$rootfs" "$mirror" >"$BUILD_DIR/debootstrap.log" 2>&1; then
            break
        fi
        unmount_under "$rootfs" || die "cannot unmount what debootstrap mounted under $rootfs"
        tail -20 "$BUILD_DIR/debootstrap.log" >&2
        (( attempt < 2 )) || die "debootstrap failed twice (log: $BUILD_DIR/debootstrap.log)"
        log "debootstrap failed; retrying once from scratch"
        rm -rf "${rootfs:?}"
    done
    unmount_under "$rootfs" || die "cannot unmount what debootstrap mounted under $rootfs"

    # Make it look like debian:bookworm-slim: the same apt sources, and no docs/man/locales.
    rm -f "$rootfs/etc/apt/sources.list"
    cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
EOF
    cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
    find "${rootfs:?}/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
    rm -rf "${rootfs:?}"/usr/share/man/* "${rootfs:?}"/usr/share/info/* "${rootfs:?}"/usr/share/locale/* \
        "${rootfs:?}"/var/cache/apt/archives/*.deb "${rootfs:?}"/var/cache/apt/*.bin "${rootfs:?}"/var/lib/apt/lists/* \
        "${rootfs:?}"/var/log/*.log "${rootfs:?}"/var/log/apt/* "${rootfs:?}"/dev/* 2>/dev/null || true

    check_rootfs_size "$rootfs" "$MAX_ROOTFS_MB" || die "the bootstrapped root file system is too large"
    ctr="$(buildah from scratch)"
    mnt="$(buildah mount "$ctr")"
    copy_rootfs "$rootfs" "$mnt"
    buildah umount "$ctr" >/dev/null
    buildah config \
        --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd '["bash"]' \
        --label org.opencontainers.image.title="Debian bookworm minbase (debootstrap)" \
        --label org.opencontainers.image.source="$mirror" \
        --label org.opencontainers.image.created="$created" \
        "$ctr"
    buildah commit --rm --squash "$ctr" "$LOCAL_BASE" >/dev/null
    rm -rf "${rootfs:?}"
    log "committed $LOCAL_BASE ($(buildah images --format '{{.Size}}' "$LOCAL_BASE" | head -1))"
}

resolve_base() {
    if image_exists "$BASE"; then echo "$BASE"; return; fi
    log "pulling $BASE (timeout ${PULL_TIMEOUT}s)"
    if timeout "$PULL_TIMEOUT" buildah pull --quiet "$BASE" >/dev/null 2>"$BUILD_DIR/pull.log"; then
        echo "$BASE"; return
    fi
    log "cannot pull $BASE: $(tail -1 "$BUILD_DIR/pull.log" 2>/dev/null)"
    if ! image_exists "$LOCAL_BASE"; then
        bootstrap_base
    else
        log "using existing $LOCAL_BASE"
    fi
    echo "$LOCAL_BASE"
}

# --- images ----------------------------------------------------------------------------------
# The manifest digest of an image in local storage (sha256:...), for org.opencontainers.image.base.digest.
image_digest() {
    local digest
    digest="$(buildah inspect --type image --format '{{.FromImageDigest}}' "$1")"
    [[ "$digest" == sha256:* ]] || die "no digest for $1 (got '$digest')"
    echo "$digest"
}

# Build arguments (and a read-only mount for a local folder) that point train-cpu at TORCH_INDEX.
torch_args() {
    case "$TORCH_INDEX" in
        http://* | https://*) echo "--build-arg=TORCH_INDEX=$TORCH_INDEX" ;;
        *)
            local dir="${TORCH_INDEX#file://}"
            [[ -d "$dir" ]] || die "TORCH_INDEX=$TORCH_INDEX is neither an http(s) URL nor a folder"
            # /mnt exists (empty) in every Debian layer, so the mount point leaves no trace in the image.
            echo "--volume=$(cd "$dir" && pwd):/mnt:ro"
            echo "--build-arg=TORCH_INDEX=/mnt" ;;
    esac
}

build_image() {
    local dockerfile="$1" tag="$2" archive="$3" base="$4"
    shift 4
    local -a extra=("$@") ca_mount=()
    local base_digest
    base_digest="$(image_digest "$base")"
    if [[ -n "$HOST_CA_BUNDLE" && -f "$HOST_CA_BUNDLE" ]]; then
        # A build secret, not a bind mount: `-v` over /etc/ssl/certs/ca-certificates.crt breaks the
        # ca-certificates package ("Device or resource busy"), and a bind mount elsewhere leaves an
        # empty mount point in every layer. The Dockerfiles point PIP_CERT at the secret if present.
        ca_mount=(--secret "id=pip_cert,src=$HOST_CA_BUNDLE")
    fi
    log "building $tag from $dockerfile on $base ($base_digest)"
    local t0=$SECONDS
    buildah bud \
        --format docker --isolation chroot --network host --layers --force-rm \
        "${ca_mount[@]}" "${extra[@]}" \
        --build-arg BASE="$base" \
        --build-arg BASE_DIGEST="$base_digest" \
        --build-arg VERSION="$version" \
        --build-arg REVISION="$revision" \
        --build-arg CREATED="$created" \
        --build-arg SOURCE="$source_url" \
        -f "$dockerfile" -t "$tag" "${CONTEXT:-$repo}"
    log "built $tag in $((SECONDS - t0)) s; size $(buildah images --format '{{.Size}}' "$tag" | head -1)"
    if [[ "$SAVE" == 1 ]]; then
        mkdir -p "$OUT_DIR"
        rm -f "$archive"
        buildah push --quiet "$tag" "$SAVE_FORMAT:$archive:$tag"
        log "saved $archive ($(du -h "$archive" | cut -f1), $SAVE_FORMAT)"
    fi
}

mkdir -p "$BUILD_DIR"
case "$target" in
    base)
        resolve_base >/dev/null ;;
    cpu)
        build_image "$here/Dockerfile" "localhost/scrcl-cli:$version" "$OUT_DIR/scrcl-cli_$version.tar" "$(resolve_base)" ;;
    train-cpu)
        mapfile -t torch < <(torch_args)
        (( ${#torch[@]} )) || exit 1
        build_image "$here/Dockerfile.train-cpu" "localhost/scrcl-cli:$version-train-cpu" \
            "$OUT_DIR/scrcl-cli_$version-train-cpu.tar" "$(resolve_base)" "${torch[@]}" ;;
    cuda)
        build_image "$here/Dockerfile.cuda" "localhost/scrcl-cli:$version-cuda" "$OUT_DIR/scrcl-cli_$version-cuda.tar" "$(resolve_base)" ;;
    all)
        "$0" cpu && "$0" train-cpu && "$0" cuda ;;
    *)
        die "usage: $0 cpu|train-cpu|cuda|base|all" ;;
esac
