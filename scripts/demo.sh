#!/usr/bin/env bash
# make demo: Orthanc + OHIF + radlens on loopback, a phantom study pushed with storescu, the
# findings printed and the OHIF URL that shows them. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m radlens.demo run "$@"
