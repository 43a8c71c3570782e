#!/usr/bin/env bash
# Retrain one of radlens's shipped models under the evaluation protocol (test set held out
# first, temperature scaling on validation, split and provenance in the card), measure it on
# fresh phantoms, and put the weights where the package ships them and the report in
# docs/measured. The commands are the ones the shipped cards record; run from the repository
# root with .venv made (make serve or make test). The lesion model wants a GPU (about four
# minutes on one H100; hours on two CPU cores); the density model takes about 18 minutes on
# two CPU cores, its ablation (trained without class weights, so on every view) most of them;
# the dermoscopy model about 50 minutes on two CPU cores.
#
#   scripts/retrain-shipped-model.sh mammo_density
#   scripts/retrain-shipped-model.sh breast_us [device]
#   scripts/retrain-shipped-model.sh dermoscopy [device]
set -euo pipefail
task=${1:?usage: retrain-shipped-model.sh breast_us|mammo_density|dermoscopy [device]}
device=${2:-auto}
radlens=${RADLENS:-.venv/bin/radlens}
work=$(mktemp -d "${TMPDIR:-/tmp}/radlens-retrain.XXXXXX")
trap 'rm -rf "$work"' EXIT

case "$task" in
  mammo_density)
    weights=radlens/tasks/mammo_density/weights/density
    data_commands=("radlens phantoms --task mammo_density --out train --n 400 --seed 1 --size 256"
                   "radlens phantoms --task mammo_density --out fresh --n 100 --seed 99 --size 256")
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
    data_commands=("radlens phantoms --out train --n 1600 --seed 20261122"
                   "radlens phantoms --out fresh --n 300 --seed 4242")
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
  dermoscopy)
    weights=radlens/tasks/dermoscopy/weights/dermoscopy
    data_commands=("radlens phantoms --task dermoscopy --out train --n 3200 --seed 1"
                   "radlens phantoms --task dermoscopy --out fresh --n 400 --seed 99")
    "$radlens" phantoms --task dermoscopy --out "$work/train" --n 3200 --seed 1
    "$radlens" train --task dermoscopy --data "$work/train" --out "$work/model" --epochs 80 \
      --segmenter-epochs 30 --batch-size 32 --learning-rate 3e-4 --patience 12 \
      --alignment-weight 3 --seed 0 --device "$device"
    "$radlens" phantoms --task dermoscopy --out "$work/fresh" --n 400 --seed 99
    "$radlens" evaluate --task dermoscopy --data "$work/fresh" --model "$work/model" \
      --out "$work/eval" --device "$device"
    report=docs/measured/dermoscopy-fresh-99
    cp "$work/eval/report.md" "$report.md"
    for figure in alignment reliability; do
      cp "$work/eval/$figure.png" "$report-$figure.png"
      sed -i "s#\`$figure.png\`#\`${report##*/}-$figure.png\`#" "$report.md"
    done
    ;;
  *) echo "retrain-shipped-model: unknown task $task (breast_us, mammo_density or dermoscopy)" >&2
     exit 2 ;;
esac

# The card's hand-written parts carry over: the lesion card's acceptance section names the
# figures the shipped-model test re-measures on new phantoms, and a card's note says what its
# figures mean. The ablation's weights stay out of the package (its figures are in the card),
# and the reports went to docs/measured. The temporary folder's name leaves the files: "train",
# "fresh" and "model" are the folders the phantom commands (recorded as data_commands) write.
rm -rf "$work/model/ablation-unweighted" "$work/model/test"
rm -f "$work/model"/fold*/model.pt  # each fold's weights: the selected one is model.pt
find "$work/model" -maxdepth 1 \( -name '*.json' -o -name '*.md' \) \
  -exec sed -i "s#$work/##g" {} +
sed -i "s#$work/##g" "$report.md"
.venv/bin/python - "$weights/card.json" "$work/model/card.json" "$work/" "${data_commands[@]}" <<'PY'
import json, pathlib, sys
previous, made, work, *commands = sys.argv[1:]
new = json.loads(pathlib.Path(made).read_text().replace(work, ""))
old = json.loads(pathlib.Path(previous).read_text()) if pathlib.Path(previous).is_file() else {}
for key in ("acceptance", "note"):
    if key in old and key not in new:
        new[key] = old[key]
if "name" in old:  # the shipped model keeps its name; its version says which weights
    new["name"] = old["name"]
new["data_commands"] = [command.replace(work, "") for command in commands]
pathlib.Path(made).write_text(json.dumps(new, indent=2))
PY
rm -rf "$weights"
mkdir -p "$weights"
cp -r "$work/model/." "$weights/"
"$radlens" models verify "$weights"
echo "retrained $task into $weights; report in $report.md"
