#!/usr/bin/env bash
# Install the real peers the tests use, from Debian's packages, when they are missing:
#   dcmtk (storescu, storescp, echoscu, dcmdump, dsrdump), dicom3tools (dciodvfy),
#   Orthanc with its DICOMweb plugin (the PACS), Chromium (the browser that runs OHIF),
#   PostgreSQL (the cluster's state database, started throw-away by the tests), HAProxy;
#   Ray comes from pip with the dev extras,
#   and, when the viewer test runs, OHIF's prebuilt viewer and playwright-core from npm.
set -euo pipefail

declare -A package_for=([storescu]=dcmtk [storescp]=dcmtk [echoscu]=dcmtk [dsrdump]=dcmtk
                        [dciodvfy]=dicom3tools [Orthanc]=orthanc [chromium]=chromium
                        [node]=nodejs [npm]=npm [pdftotext]=poppler-utils [haproxy]=haproxy)
missing=()
for tool in "${!package_for[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${package_for[$tool]}")
done
if [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] \
   && [ ! -e /usr/lib/orthanc/plugins/libOrthancDicomWeb.so ]; then
  missing+=(orthanc-dicomweb)
fi
if ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  missing+=(postgresql)
fi

if [ ${#missing[@]} -gt 0 ]; then
  packages=$(printf '%s\n' "${missing[@]}" | sort -u | tr '\n' ' ')
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "install as root: apt-get install -y $packages" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "installing $packages(Debian packages) for the tests"
  $sudo apt-get update -qq
  # Debian's orthanc package starts a system service where an init system runs; the tests
  # start their own Orthanc, on free ports, so that one is not needed.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $packages >/dev/null
fi
