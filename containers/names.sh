#!/usr/bin/env bash
# The published names of the images and SIF files: one source for build.sh's tags, push.sh, sif.sh,
# the release workflow and the Nextflow modules (tests/test_release.py checks the modules).
#
#   containers/names.sh cpu|train-cpu|cuda [image|sif]   # prints the reference, e.g. ghcr.io/scrcl-cli/scrcl-cli:0.1.0
#
# cpu: embed/cluster (onnxruntime, no torch); train-cpu: train on the CPU (CPU torch);
# cuda: train and inference on a GPU.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REGISTRY="${REGISTRY:-ghcr.io/scrcl-cli/scrcl-cli}"
VERSION="${VERSION:-$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$here/../scrcl_cli/_version.py")}"
flavour="${1:?usage: names.sh cpu|train-cpu|cuda [image|sif]}"
kind="${2:-image}"
case "$flavour" in
    cpu) tag="$VERSION" ;;
    train-cpu) tag="$VERSION-train-cpu" ;;
    cuda) tag="$VERSION-cuda" ;;
    *) echo "names.sh: unknown flavour '$flavour' (cpu, train-cpu or cuda)" >&2; exit 2 ;;
esac
case "$kind" in
    image) echo "$REGISTRY:$tag" ;;
    sif) echo "oras://$REGISTRY:$tag-sif" ;;
    *) echo "names.sh: unknown kind '$kind' (image or sif)" >&2; exit 2 ;;
esac
