#!/usr/bin/env bash
# The venv the open_clip test runs in (.venv-clip): open_clip imports torchvision, and no
# torchvision that imports beside radlens's pinned torch (2.13.0, a CPU build on these machines) can be had here:
# PyPI's wheels for it are built for the CUDA torch ("operator torchvision::nms does not
# exist") and PyPI has no source. The pairs below are the ones this machine's package mirror
# holds for Python 3.11, so the test runs radlens's own code on a torch/torchvision pair that
# match. Users install radlens[clip] with the torchvision made for their torch.
set -euo pipefail
venv=${1:-.venv-clip}
python=${PYTHON:-python3}
case "$(uname -m)" in
  x86_64) pair=("torch==2.14.1" "torchvision==0.29.1") ;;
  aarch64) pair=("torch==2.9.1" "torchvision==0.24.1") ;;
  *) echo "install-clip-venv: no known torch/torchvision pair for $(uname -m)" >&2; exit 1 ;;
esac
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
"${pip[@]}" install "${pair[@]}" "open_clip_torch>=3.3"
# radlens's own requirements without its torch pin, then radlens itself without dependencies
"$venv/bin/python" - <<'PY' > "$venv/requirements-no-torch.txt"
import tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(d for d in project["dependencies"] if not d.replace(" ", "").startswith("torch")))
PY
"${pip[@]}" install -r "$venv/requirements-no-torch.txt" "pytest>=8.0"
"${pip[@]}" install --no-deps -e .
"$venv/bin/python" -c "import open_clip, torchvision, radlens.tasks.mammo_density.clip_backbone" 
