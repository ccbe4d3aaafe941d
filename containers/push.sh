#!/usr/bin/env bash
# Push an image that containers/build.sh wrote (containers/out/*.tar) to its published name and print
# its digest. Used by the release workflow; needs skopeo and a registry login (REGISTRY_AUTH_FILE).
#
#   containers/push.sh cpu|train-cpu|cuda   # prints ghcr.io/scrcl-cli/scrcl-cli@sha256:...
#   DRY_RUN=1 containers/push.sh cpu        # checks the archive and prints what it would push
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
flavour="${1:?usage: push.sh cpu|train-cpu|cuda}"
name="$("$here/names.sh" "$flavour" image)"
version="${name##*:}"
archive="${OUT_DIR:-$here/out}/scrcl-cli_${version}.tar"
[[ -f "$archive" ]] || { echo "push.sh: $archive not found; run containers/build.sh $flavour first" >&2; exit 1; }
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "would push docker-archive:$archive to docker://$name"
    exit 0
fi
digest_file="$(mktemp)"
trap 'rm -f "$digest_file"' EXIT
skopeo copy --digestfile "$digest_file" "docker-archive:$archive" "docker://$name"
echo "${name%:*}@$(cat "$digest_file")"
