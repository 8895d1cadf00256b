#!/usr/bin/env bash
# Installs the Debian packages given as arguments (idempotent: installed ones are skipped).
# Usage: setup-system.sh PACKAGE...
# Not root and something missing: print the exact command, and the NETCARVE_DATA alternative.
set -euo pipefail

PACKAGES=("$@")

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

# A user who keeps Fashion-MNIST elsewhere does not need the Debian package.
if [ -n "${NETCARVE_DATA:-}" ] && { [ -e "$NETCARVE_DATA/t10k-images-idx3-ubyte.gz" ] || \
     [ -e "$NETCARVE_DATA/fashion-mnist/t10k-images-idx3-ubyte.gz" ]; }; then
  missing=("${missing[@]/dataset-fashion-mnist}")
  read -r -a missing <<< "${missing[*]}"
fi

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
else
  cat >&2 <<MSG
setup: missing Debian packages: ${missing[*]}
  install them with:   sudo apt-get update && sudo apt-get install -y ${missing[*]}
  or, for the data only, point netcarve at a folder holding the Fashion-MNIST IDX files:
                       export NETCARVE_DATA=/path/to/fashion-mnist
MSG
  exit 1
fi
