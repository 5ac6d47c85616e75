#!/usr/bin/env bash
# Install Khronos' glTF validator (npm package `gltf-validator`) into a
# project-local folder so `recon.export.validate` can run it with node.
# Idempotent: does nothing when the package is already there.
#   usage: tools/install_validator.sh [PREFIX]   (default: <repo>/.tools)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="${1:-${P3D_TOOLS_DIR:-$here/../.tools}}"
version="${GLTF_VALIDATOR_VERSION:-2.0.0-dev.3.10}"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "install_validator: node and npm are needed (apt-get install nodejs npm)" >&2
  exit 4
fi
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"
if [ -f "$prefix/node_modules/gltf-validator/package.json" ]; then
  echo "gltf-validator already installed in $prefix/node_modules"
  exit 0
fi
npm install --prefix "$prefix" --no-audit --no-fund --no-save --loglevel=error "gltf-validator@$version"
test -f "$prefix/node_modules/gltf-validator/package.json"
echo "gltf-validator installed in $prefix/node_modules"
