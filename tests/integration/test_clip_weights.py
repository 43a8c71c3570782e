"""Your own CLIP weights as the density model, through open_clip: a small local checkpoint laid
out as BiomedCLIP's folder is fine-tuned by `radlens train --task density --clip`, evaluated,
explained (Grad-CAM on its ViT tokens) and run by the agent's pipeline on a mammography study.

open_clip imports torchvision, and no torchvision imports beside radlens's pinned CPU torch on
this machine, so these commands run in `.venv-clip` (made by `make test`; see
scripts/install-clip-venv.sh), on radlens's own code. In `.venv`, without open_clip, the same
command says what is missing."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, radlens_cli

CLIP_VENV = REPO / ".venv-clip"
CLIP_DIR = REPO / "tests" / "clip"


def _clip_python() -> Path:
    python = CLIP_VENV / "bin" / "python"
    if not python.exists():
        raise RuntimeError("the open_clip venv is missing: run `make test` (or `make clip`)")
    return python


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(_clip_python()), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("biomedclip-like")
    made = _run(str(CLIP_DIR / "make_checkpoint.py"), str(folder))
    assert made.returncode == 0, made.stderr
    return folder


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mammo")
    for name, seed in (("train", 21), ("test", 22)):
        made = radlens_cli("phantoms", "--task", "mammo_density", "--out", str(root / name), "--n",
                           "8", "--seed", str(seed), "--size", "128", "--dicom")
        assert made.returncode == 0, made.stderr
    return root / "train", root / "test"


def test_a_users_clip_folder_is_fine_tuned_evaluated_explained_and_run_by_the_agent(
        checkpoint, phantoms, tmp_path):
    train, test = phantoms
    out = tmp_path / "model"
    trained = _run("-m", "radlens", "train", "--task", "mammo_density", "--data", str(train),
                   "--out", str(out), "--clip", str(checkpoint), "--folds", "2", "--epochs",
                   "2", "--batch-size", "8", "--device", "cpu")
    assert trained.returncode == 0, trained.stderr[-3000:]
    card = json.loads((out / "card.json").read_text())
    assert card["architecture"].startswith("open_clip CLIP, ViT (2 layers) image tower")
    assert card["clip"] == {"from": str(checkpoint), "folder": "clip"}
    assert card["scope"]["modalities"] == ["MG"] and card["ood"]["threshold"] > 0
    # the saved model is an open_clip folder of the same structure, with weights changed
    saved = out / "clip"
    assert json.loads((saved / "open_clip_config.json").read_text())["model_cfg"] == \
        json.loads((checkpoint / "open_clip_config.json").read_text())["model_cfg"]
    before = torch.load(checkpoint / "open_clip_pytorch_model.bin", weights_only=True)
    after = torch.load(saved / "open_clip_pytorch_model.bin", weights_only=True)
    assert before.keys() == after.keys()
    assert not torch.equal(before["visual.conv1.weight"], after["visual.conv1.weight"])
    assert not torch.equal(before["token_embedding.weight"], after["token_embedding.weight"])

    evaluated = _run("-m", "radlens", "evaluate", "--task", "mammo_density", "--data", str(test),
                     "--model", str(out), "--out", str(tmp_path / "eval"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["cases"] == 32 and sum(map(sum, report["confusion"])) == 32

    image = sorted((test / "images").glob("*.png"))[0]
    explained = _run(str(CLIP_DIR / "explain_one.py"), str(out), str(image))
    assert explained.returncode == 0, explained.stderr[-3000:]
    facts = json.loads(explained.stdout.strip().splitlines()[-1])
    assert facts["kind"] == "OpenClipDensity" and facts["cam_max"] > 0
    assert facts["cam_shape"] == [128, 102]  # back on the mammogram's own grid
    assert abs(sum(facts["shares"].values()) - 1) < 1e-6
    assert facts["outside_crop"] == 0  # the network saw the breast's crop, nothing else

    # The agent's pipeline with the fine-tuned model as its density model.
    study = sorted((test / "dicom").iterdir())[0]
    run = subprocess.run([str(_clip_python()), "-m", "radlens", "process", str(study), "--out",
                          str(tmp_path / "agent")], capture_output=True, text=True, timeout=600,
                         cwd=REPO, env={**os.environ, "RADLENS_DENSITY__WEIGHTS": str(out)})
    assert run.returncode == 0, run.stderr[-3000:]
    (findings_path,) = (tmp_path / "agent" / "results").glob("*/findings.json")
    findings = json.loads(findings_path.read_text())
    readings = [analysis for image in findings["images"] for analysis in image["analyses"]
                if analysis["task"] == "mammo_density"]
    abstained = [image for image in findings["images"] if image["abstained"]]
    assert len(readings) + len(abstained) == 4
    for reading in readings:
        assert reading["model"]["architecture"].startswith("open_clip CLIP")
    assert (tmp_path / "agent" / "results" / findings["study_instance_uid"] / "report.pdf"
            ).exists()


def test_without_open_clip_the_clip_option_says_what_is_missing(checkpoint, phantoms,
                                                                 tmp_path):
    """In the project's own venv (pinned CPU torch, no open_clip), a clear error and no model."""
    train, _ = phantoms
    result = radlens_cli("train", "--task", "mammo_density", "--data", str(train), "--out",
                         str(tmp_path / "model"), "--clip", str(checkpoint))
    assert result.returncode == 1
    assert "needs open_clip and a torchvision built for the installed torch" in result.stderr
    assert "radlens[clip]" in result.stderr
    assert not (tmp_path / "model").exists()
