#!/usr/bin/env bash
# Guards for a debootstrapped root filesystem before it is copied into an image (sourced by build.sh).
#
# debootstrap mounts /proc (and sometimes /sys, /dev/pts) inside the target. If such a mount stays
# busy, a plain copy takes the host's live /proc into the image and can fill the disk. So: unmount
# everything under the rootfs (deepest first, lazily as a fallback), refuse to go on if anything is
# still mounted there, refuse a rootfs larger than expected, and copy within one file system only.
#
#   source containers/rootfs_guards.sh
#   unmount_under DIR            # MOUNTINFO (default /proc/self/mountinfo) says what is mounted
#   check_rootfs_size DIR MAX_MB
#   copy_rootfs SRC DEST         # cp -a --one-file-system
set -euo pipefail

# Mount points at or below DIR, deepest first (field 5 of mountinfo; octal escapes such as \040 decoded).
mounts_under() {
    local dir="${1%/}" mountinfo="${MOUNTINFO:-/proc/self/mountinfo}"
    awk '{print $5}' "$mountinfo" | while IFS= read -r mp; do
        mp="$(printf '%b' "$mp")"
        if [[ "$mp" == "$dir" || "$mp" == "$dir"/* ]]; then
            printf '%d %s\n' "${#mp}" "$mp"
        fi
    done | sort -rn | cut -d' ' -f2-
}

unmount_under() {
    local dir="$1" mp left
    while IFS= read -r mp; do
        [[ -n "$mp" ]] || continue
        umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null || true
    done < <(mounts_under "$dir")
    left="$(mounts_under "$dir")"
    if [[ -n "$left" ]]; then
        printf 'still mounted under %s (unmount them, then rerun): %s\n' "$dir" "$(echo "$left" | tr '\n' ' ')" >&2
        return 1
    fi
}

# Fail when DIR (this file system only) holds more than MAX_MB MiB: a minbase is about 150 MiB.
check_rootfs_size() {
    local dir="$1" max_mb="$2" size_mb
    size_mb="$(du -sxm "$dir" | cut -f1)"
    if (( size_mb > max_mb )); then
        printf '%s holds %s MiB, more than the %s MiB a Debian minbase should (a host file system copied in?); set MAX_ROOTFS_MB to allow it\n' \
            "$dir" "$size_mb" "$max_mb" >&2
        return 1
    fi
}

copy_rootfs() {
    cp -a --one-file-system "$1"/. "$2"/
}
