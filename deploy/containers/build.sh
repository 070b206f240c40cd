#!/usr/bin/env bash
# Builds the base image (Debian minbase + python3, made with mmdebstrap: no registry needed) and the three service
# images localhost/imgtxt-{image-encoder,text-encoder,search}:<package version>.
#
# Usage: deploy/containers/build.sh [TARGET...]      (default: image-encoder text-encoder search)
# Environment:
#   IMGTXT_CONTAINER_CACHE   where the base root filesystem tarball is cached (default: artifacts/containers)
#   IMGTXT_DEBIAN_SUITE      Debian suite of the base (default: bookworm)
#   IMGTXT_DEBIAN_MIRROR     Debian mirror (default: http://deb.debian.org)
#   IMGTXT_ONNXRUNTIME       onnxruntime (the CPU build, default) or onnxruntime-gpu (tagged <version>-gpu)
#   IMGTXT_IMAGE_TAG         tag of the images (default: the version in pyproject.toml)
# Needs podman, mmdebstrap and runc (Debian packages of the same names) and root (rootful podman).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

suite="${IMGTXT_DEBIAN_SUITE:-bookworm}"
mirror="${IMGTXT_DEBIAN_MIRROR:-http://deb.debian.org}"
onnxruntime="${IMGTXT_ONNXRUNTIME:-onnxruntime}"
cache="${IMGTXT_CONTAINER_CACHE:-$root/artifacts/containers}"
tag="${IMGTXT_IMAGE_TAG:-$version}"
[[ "$onnxruntime" == onnxruntime-gpu && -z "${IMGTXT_IMAGE_TAG:-}" ]] && tag="$version-gpu"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(image-encoder text-encoder search)

# The base root filesystem: everything that decides its content goes into the cache key.
# python3-venv (ensurepip, ~3 MB) only serves the builder stage, but installing it there would run apt in a build
# step, where ca-certificates cannot configure under the CA bundle's read-only mount (containers.conf).
packages="python3,python3-venv"
mmdebstrap_args=(
  --variant=minbase
  --include="$packages"
  # merged /usr set up by the hook instead of the usrmerge package (which pulls perl: 45 MB)
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
)
sources=(
  "deb $mirror/debian $suite main"
  "deb $mirror/debian $suite-updates main"
  "deb $mirror/debian-security $suite-security main"
)
key="$(printf '%s\n' "$suite" "${mmdebstrap_args[@]}" "${sources[@]}" | sha256sum | cut -c1-12)"
base="localhost/imgtxt-base:$suite-$key"
tarball="$cache/base-$suite-$key.tar"

if [[ ! -s "$tarball" ]]; then
  echo "== mmdebstrap $suite (minbase + $packages) -> $tarball"
  mkdir -p "$cache"
  start=$SECONDS
  if ! mmdebstrap --format=tar "${mmdebstrap_args[@]}" "$suite" "$tarball.tmp" "${sources[@]}" \
    >"$tarball.log" 2>&1; then
    tail -n 40 "$tarball.log" >&2
    exit 1
  fi
  mv "$tarball.tmp" "$tarball"
  echo "   mmdebstrap: $((SECONDS - start)) s"
fi
if ! podman image exists "$base"; then
  echo "== podman import $tarball -> $base"
  podman import --quiet "$tarball" "$base" >/dev/null
fi

for target in "${targets[@]}"; do
  image="localhost/imgtxt-$target:$tag"
  echo "== podman build --target $target -> $image"
  start=$SECONDS
  podman build --pull=never --quiet \
    --file "$here/Containerfile" --ignorefile "$here/containerignore" \
    --build-arg BASE="$base" --build-arg ONNXRUNTIME="$onnxruntime" \
    --label org.opencontainers.image.version="$version" \
    --target "$target" --tag "$image" "$root" >/dev/null
  size="$(podman image inspect --format '{{.Size}}' "$image" | numfmt --to=si --suffix=B)"
  echo "   $image: $((SECONDS - start)) s, $size"
done
