#!/usr/bin/env bash
# The DICOM path end to end: start radlens, push a synthetic ultrasound study with dcmtk's
# storescu, wait until the study is processed, print the status and the findings, stop.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
demo=$(mktemp -d /tmp/radlens-demo.XXXX)
port=${DEMO_PORT:-11112}
export RADLENS_STORAGE__DATA_DIR="$demo/data" RADLENS_DICOM__PORT="$port" \
       RADLENS_DICOM__HOST=127.0.0.1 RADLENS_ASSEMBLY__QUIET_PERIOD_S=2

$BIN/radlens serve >"$demo/radlens.log" 2>&1 &
agent=$!
trap 'kill $agent 2>/dev/null; wait $agent 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  echoscu -aec RADLENS 127.0.0.1 "$port" 2>/dev/null && break
  sleep 0.2
done

$BIN/python - "$demo/study" <<'PY'
import sys
from pathlib import Path
from radlens.dicom_io.synthetic import write_us_studies
files = list(write_us_studies(Path(sys.argv[1]), studies=1, instances_per_study=5))
print(f"made {len(files)} synthetic ultrasound frames in {sys.argv[1]}")
PY
echo "storescu -aec RADLENS 127.0.0.1 $port $demo/study/*.dcm"
TCP_NODELAY=1 storescu -aec RADLENS 127.0.0.1 "$port" "$demo"/study/*.dcm

for _ in $(seq 150); do
  ls "$demo"/data/results/*/findings.json >/dev/null 2>&1 && break
  sleep 0.2
done
$BIN/radlens status
echo "findings: $(ls "$demo"/data/results/*/findings.json)"
$BIN/python -c "
import json, sys, glob
f = json.load(open(glob.glob('$demo/data/results/*/findings.json')[0]))
for i in f['images']:
    s = i['spacing']
    print(f\"  {i['modality']} {i['rows']}x{i['columns']} x{i['frames']} frame(s), \"
          f\"{s['row_mm']:.2f} mm/pixel from {s['source']}\" if s else '  no physical spacing')
"
echo "log: $demo/radlens.log"
