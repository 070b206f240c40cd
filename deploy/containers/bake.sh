#!/usr/bin/env bash
# Bakes a model bundle into an encoder image, localhost/imgtxt-<target>:<tag>-<bundle version>; run build.sh first.
#
# Usage: deploy/containers/bake.sh TARGET BUNDLE_DIR [TAG]     (TARGET: image-encoder or text-encoder)
# Environment: IMGTXT_IMAGE_TAG, the tag of the image to start from (default: the version in pyproject.toml).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
[[ $# -ge 2 ]] || { echo "usage: $0 TARGET BUNDLE_DIR [TAG]" >&2; exit 2; }
target="$1"
bundle="$(cd "$2" && pwd)"
[[ -f "$bundle/manifest.json" ]] || { echo "$0: $bundle has no manifest.json (not a model bundle)" >&2; exit 2; }
from="localhost/imgtxt-$target:${IMGTXT_IMAGE_TAG:-$version}"
# the bundle version, with what a tag cannot hold replaced by "-"
bundle_version="$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["bundle_version"])' \
  "$bundle/manifest.json" | tr -c 'A-Za-z0-9_.\n-' '-')"
image="${3:-localhost/imgtxt-$target:${IMGTXT_IMAGE_TAG:-$version}-$bundle_version}"
podman build --pull=never --quiet --file "$here/Containerfile.bundle" --build-arg IMAGE="$from" \
  --tag "$image" "$bundle" >/dev/null
echo "$image"
