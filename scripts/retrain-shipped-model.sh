#!/usr/bin/env bash
# Retrain one of radlens's shipped models under the evaluation protocol (test set held out
# first, temperature scaling on validation, split and provenance in the card), measure it on
# fresh phantoms, and put the weights where the package ships them and the report in
# docs/measured. The commands are the ones the shipped cards record; run from the repository
# root with .venv made (make serve or make test). The lesion model wants a GPU (about four
# minutes on one H100; hours on two CPU cores); the density model takes about seven minutes
# on two CPU cores.
#
#   scripts/retrain-shipped-model.sh mammo_density
#   scripts/retrain-shipped-model.sh breast_us [device]
set -euo pipefail
task=${1:?usage: retrain-shipped-model.sh breast_us|mammo_density [device]}
device=${2:-auto}
radlens=${RADLENS:-.venv/bin/radlens}
work=$(mktemp -d "${TMPDIR:-/tmp}/radlens-retrain.XXXXXX")
trap 'rm -rf "$work"' EXIT

case "$task" in
  mammo_density)
    weights=radlens/tasks/mammo_density/weights/density
    "$radlens" phantoms --task mammo_density --out "$work/train" --n 400 --seed 1 --size 256
    "$radlens" phantoms --task mammo_density --out "$work/fresh" --n 100 --seed 99 --size 256
    "$radlens" train --task mammo_density --data "$work/train" --out "$work/model" \
      --folds 0 --epochs 30 --size 224 --seed 0 --test "$work/fresh" --ablation \
      --device "$device"
    report=docs/measured/mammo_density-density-fresh-99
    cp "$work/model/test/report.md" "$report.md"
    cp "$work/model/test/reliability.png" "$report-reliability.png"
    ;;
  breast_us)
    weights=radlens/tasks/breast_us/weights/default
    "$radlens" phantoms --out "$work/train" --n 1600 --seed 20261122
    "$radlens" train --data "$work/train" --out "$work/model" --arch unet --epochs 100 \
      --batch-size 16 --seed 0 --aspect pad --device "$device"
    "$radlens" phantoms --out "$work/fresh" --n 300 --seed 4242
    "$radlens" evaluate --data "$work/fresh" --model "$work/model" --out "$work/eval" \
      --device "$device"
    report=docs/measured/breast_us-default-fresh-4242
    cp "$work/eval/report.md" "$report.md"
    cp "$work/eval/reliability.png" "$report-reliability.png"
    ;;
  *) echo "retrain-shipped-model: unknown task $task (breast_us or mammo_density)" >&2; exit 2 ;;
esac

# The card's hand-written parts carry over: the lesion card's acceptance section names the
# figures the shipped-model test re-measures on new phantoms. The ablation's weights stay
# out of the package (its figures are in the card), and the reports went to docs/measured.
rm -rf "$work/model/ablation-unweighted" "$work/model/test"
if [ -f "$weights/card.json" ]; then
  .venv/bin/python - "$weights/card.json" "$work/model/card.json" <<'PY'
import json, sys
old, new = (json.load(open(path)) for path in sys.argv[1:])
for key in ("acceptance",):
    if key in old and key not in new:
        new[key] = old[key]
json.dump(new, open(sys.argv[2], "w"), indent=2)
PY
fi
rm -rf "$weights"
mkdir -p "$weights"
cp -r "$work/model/." "$weights/"
"$radlens" models verify "$weights"
echo "retrained $task into $weights; report in $report.md"
