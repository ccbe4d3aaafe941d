#!/usr/bin/env bash
# Build the SIF of a pushed image (by digest) and push it as an ORAS artifact to its published name.
# Used by the release workflow; needs apptainer and a registry login.
#
#   containers/sif.sh cpu|train-cpu|cuda ghcr.io/scrcl-cli/scrcl-cli@sha256:...
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
flavour="${1:?usage: sif.sh cpu|train-cpu|cuda IMAGE@DIGEST}"
ref="${2:?usage: sif.sh cpu|train-cpu|cuda IMAGE@DIGEST}"
[[ "$ref" == *@sha256:* ]] || { echo "sif.sh: pass the image by digest (name@sha256:...), not by tag" >&2; exit 2; }
target="$("$here/names.sh" "$flavour" sif)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
apptainer build "$work/scrcl.sif" "docker://$ref"
apptainer push "$work/scrcl.sif" "$target"
echo "$target"
