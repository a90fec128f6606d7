#!/usr/bin/env bash
# Fetches the public ONNX Runtime and TensorRT headers the native build needs, once, into a
# cache outside the clone (see shared/BUILDING.md for why they come from these packages).
#   fetch_headers.sh ort|trt   -> prints the include directory
set -euo pipefail
cache="${MOE_EXPORT_CACHE:-$HOME/.cache/moe-export}"
mkdir -p "$cache"
case "${1:-}" in
  ort)
    dest="$cache/ort-headers-api29"   # npm com.github.asus4.onnxruntime@0.4.9, ORT_API_VERSION 29
    if [ ! -f "$dest/onnxruntime_cxx_api.h" ]; then
      tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
      (cd "$tmp" && npm pack --silent com.github.asus4.onnxruntime@0.4.9 >/dev/null)
      tar xzf "$tmp"/*.tgz -C "$tmp" --wildcards '*ios-arm64/onnxruntime.framework/Headers/*'
      mkdir -p "$dest.part" && cp "$tmp"/package/Plugins/*/onnxruntime.xcframework/ios-arm64/onnxruntime.framework/Headers/*.h "$dest.part/"
      rm -rf "$dest" && mv "$dest.part" "$dest"
    fi
    echo "$dest" ;;
  trt)
    dest="$cache/tensorrt-headers-10.14"   # PyPI kernel-lens==2.0.1 ships the public headers
    if [ ! -f "$dest/NvInfer.h" ]; then
      tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
      py=$(command -v python3 || command -v python)
      { "$py" -m pip download -q --no-deps --no-cache-dir kernel-lens==2.0.1 -d "$tmp" \
          || pip download -q --no-deps --no-cache-dir kernel-lens==2.0.1 -d "$tmp"; } >/dev/null 2>&1 \
        || { echo "fetch_headers: could not download kernel-lens (TensorRT headers)" >&2; exit 1; }
      (cd "$tmp" && "$py" -m zipfile -e kernel_lens-*.whl x >/dev/null)
      mkdir -p "$dest.part" && cp "$tmp"/x/kernel_lens/include/tensorrt/*.h "$dest.part/"
      rm -rf "$dest" && mv "$dest.part" "$dest"
    fi
    echo "$dest" ;;
  *) echo "usage: fetch_headers.sh ort|trt" >&2; exit 2 ;;
esac
