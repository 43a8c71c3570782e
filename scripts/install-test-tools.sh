#!/usr/bin/env bash
# Install the real DICOM peers the tests use, from Debian's packages, when they are missing:
#   dcmtk (storescu, storescp, echoscu, dcmdump, dsrdump) and dicom3tools (dciodvfy).
set -euo pipefail

declare -A package_for=([storescu]=dcmtk [storescp]=dcmtk [echoscu]=dcmtk [dciodvfy]=dicom3tools)
missing=()
for tool in "${!package_for[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${package_for[$tool]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install as root: apt-get install -y $packages" >&2; exit 1; }
  sudo="sudo"
fi
echo "installing $packages(Debian packages) for the tests"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $packages >/dev/null
