"""In a real browser: OHIF's prebuilt viewer (npm @ohif/app 3.13.x) reading a real Orthanc through
a same-origin proxy, driven in Debian's Chromium by playwright-core. The SEG's colour must cover
the lesion and nothing else, the SR's measurement panel must list every lesion with its numbers,
the overlay, the PDF report and the Parametric Map must display, and no page error may occur.
Screenshots stay in test-artifacts/ohif/."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image
from scipy import ndimage

from radlens.agent.offline import collect_studies, process_study
from radlens.agent.service import load_tasks
from radlens.config import Settings
from radlens.demo.ohif import OhifServer, fetch_ohif
from radlens.demo.orthanc import Orthanc
from radlens.tasks.breast_us.dicom import us_multiframe_dataset, write_phantom_study
from radlens.tasks.breast_us.phantoms import make_phantom
from tests.helpers import REPO, frames_of, require_tool

VIEWER_DIR = REPO / "tests" / "viewer"
ARTIFACTS = REPO / "test-artifacts" / "ohif"
SPACING_MM = 0.2


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (VIEWER_DIR / "node_modules" / "playwright-core").exists():
        raise RuntimeError("node and tests/viewer/node_modules are needed: run `make test`, "
                           "which installs playwright-core with npm")
    return node


def _push(orthanc: Orthanc, files: list[Path]) -> None:
    sent = subprocess.run([require_tool("storescu"), "-aec", orthanc.aet, "-R", "127.0.0.1",
                           str(orthanc.dicom_port), *map(str, files)],
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr


def _study(root: Path, name: str, *, tracked: bool) -> tuple[Path, object]:
    """The largest-lesion phantom of a held-out seed, through the real pipeline."""
    candidates = [make_phantom(321, index) for index in (4, 53)]
    phantom = max(candidates, key=lambda p: int((p.mask > 0).sum()))
    source = write_phantom_study(root / name, phantom.image, spacing_mm=SPACING_MM,
                                 case_id=name, patient_id=f"OHIF-{name}", uid_seed="ohif test",
                                 tracked=tracked)
    settings = Settings()
    settings.storage.fsync = False
    studies, _ = collect_studies([source])
    (uid,) = studies
    done = process_study(uid, studies[uid], root / "results", load_tasks(settings), settings)
    return source, done


@pytest.fixture(scope="module")
def viewer(tmp_path_factory):
    root = tmp_path_factory.mktemp("ohif")
    orthanc = Orthanc(root / "orthanc").start()
    server = OhifServer(fetch_ohif(REPO / ".cache" / "ohif"), orthanc.url).start()
    yield root, orthanc, server
    server.stop()
    orthanc.stop()


def _drive(server: OhifServer, source: Path, out: Path, steps: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    run = subprocess.run([_node(), str(VIEWER_DIR / "ohif_check.mjs"),
                          server.viewer_url(ds.StudyInstanceUID), str(out), ds.SOPInstanceUID,
                          steps], capture_output=True, text=True, timeout=400, cwd=VIEWER_DIR)
    facts = json.loads((out / "facts.json").read_text())
    assert facts["pageErrors"] == [], facts["pageErrors"]
    assert run.returncode == 0, run.stderr[-2000:]
    for name, step in facts["steps"].items():
        assert step["ok"], (name, step.get("error"))
    return facts


def _on_screen(mask: np.ndarray, image: dict, shape: tuple[int, int]) -> np.ndarray:
    """The image-grid mask drawn where OHIF draws the image (nearest neighbour)."""
    (x0, y0), (x1, y1) = image["topLeft"], image["bottomRight"]
    rows, columns = mask.shape
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    column = np.floor((xs + 0.5 - x0) * columns / (x1 - x0)).astype(int)
    row = np.floor((ys + 0.5 - y0) * rows / (y1 - y0)).astype(int)
    inside = (column >= 0) & (column < columns) & (row >= 0) & (row < rows)
    drawn = np.zeros(shape, dtype=bool)
    drawn[inside] = mask[row[inside], column[inside]]
    return drawn


def _image_box(image: dict, shape: tuple[int, int]) -> np.ndarray:
    return _on_screen(np.ones((image["rows"], image["columns"]), bool), image, shape)


def _coloured(png: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return (rgb.max(axis=-1) - rgb.min(axis=-1)) > 40


def test_seg_sr_and_overlay_in_ohif(viewer):
    root, orthanc, server = viewer
    source, done = _study(root, "plain", tracked=False)
    _push(orthanc, [source, *done.outputs.all])
    out = ARTIFACTS / "plain"
    facts = _drive(server, source, out, "source,seg,sr,overlay,pdf")

    # SEG: the overlay colour covers the lesion and nothing else.
    seg = hd.seg.segread(done.outputs.seg[0])
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    lesion = seg.get_pixels_by_source_instance([ds.SOPInstanceUID],
                                               skip_overlap_checks=True)[0].any(axis=-1)
    image = facts["steps"]["seg"]["image"]
    assert image is not None and image["rows"] == lesion.shape[0]
    shot = _coloured(out / "seg.png")
    box = _image_box(image, shot.shape)
    expected = _on_screen(lesion, image, shot.shape)
    coloured = shot & box
    assert coloured.sum() > 0.5 * expected.sum(), "no SEG overlay drawn"
    near = ndimage.binary_dilation(expected, iterations=4)
    core = ndimage.binary_erosion(expected, iterations=4)
    assert (coloured & near).sum() / coloured.sum() >= 0.95  # nothing else coloured
    assert (coloured & core).sum() / core.sum() >= 0.85  # the lesion is covered

    # SR: the measurement panel lists each lesion with its long and short axes.
    findings = json.loads(done.findings_path.read_text())
    lesions = [x for i in findings["images"] for p in frames_of(i) for x in p["lesions"]]
    sr = facts["steps"]["sr"]
    assert sr["hydrated"]
    assert f"Measurements ({len(lesions)})" in sr["panel"]
    lengths = [float(v) * 10 for v in re.findall(r"L: ([0-9.]+) cm", sr["panel"])]
    widths = [float(v) * 10 for v in re.findall(r"W: ([0-9.]+) cm", sr["panel"])]
    assert len(lengths) == len(widths) == len(lesions)
    for lesion_found, length, width in zip(lesions, lengths, widths, strict=True):
        assert length == pytest.approx(lesion_found["longest_diameter_mm"], abs=2 * SPACING_MM)
        assert width == pytest.approx(lesion_found["perpendicular_diameter_mm"],
                                      abs=2 * SPACING_MM)

    # The PDF report: OHIF's PDF viewport embeds the document it fetched through DICOMweb.
    embedded = facts["steps"]["pdf"]["embedded"]
    assert embedded and embedded["type"] == "application/pdf"
    fetched = (out / "pdf-from-ohif.pdf").read_bytes()
    assert fetched.startswith(b"%PDF") and fetched.rstrip(b"\0") == (
        done.findings_path.parent / "report.pdf").read_bytes()

    # The RGB overlay, shown as an ordinary image: heat colours and the green lesion outline.
    overlay = np.asarray(Image.open(out / "overlay.png").convert("RGB")).astype(int)
    green = (overlay[..., 1] > 180) & (overlay[..., 0] < 90) & (overlay[..., 2] < 90)
    assert green.sum() > 50


def test_parametric_map_in_ohif(viewer):
    """OHIF overlays a Parametric Map only on a volume it can build from the source's patient
    geometry ("stack viewport PMAP is not supported yet", in its own words): the map is shown
    for a frame from a position-tracked probe. Without geometry the overlay above carries it."""
    root, orthanc, server = viewer
    source, done = _study(root, "tracked", tracked=True)
    _push(orthanc, [source, *done.outputs.all])
    out = ARTIFACTS / "tracked"
    facts = _drive(server, source, out, "source,pmap")
    image = facts["steps"]["pmap"]["image"]
    assert image is not None
    assert facts["steps"]["pmap"]["actors"] >= 2, "the map was loaded but never drawn"
    shot = _coloured(out / "pmap.png")
    box = _image_box(image, shot.shape)
    coloured = shot & box
    assert coloured.sum() > 100, "no saliency colour drawn"
    seg = hd.seg.segread(done.outputs.seg[0])
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    lesion = seg.get_pixels_by_source_instance([ds.SOPInstanceUID],
                                               skip_overlap_checks=True)[0].any(axis=-1)
    expected = _on_screen(lesion, image, shot.shape)
    radius = int(np.sqrt(expected.sum() / np.pi))
    near = ndimage.binary_dilation(expected, iterations=radius)
    assert (coloured & near).sum() / coloured.sum() >= 0.5  # the map's colour is at the lesion


def test_cine_overlay_opens_in_ohif(viewer):
    """A 3-frame clip with lesions on frames 1 and 3: its one multi-frame overlay opens in OHIF
    as a 3-image stack, showing the heat map and the green outline of frame 1's lesion."""
    root, orthanc, server = viewer
    frames = np.stack([make_phantom(321, 4).image, make_phantom(321, 7, label="normal").image,
                       make_phantom(321, 53).image])
    study_uid = pydicom.uid.generate_uid(entropy_srcs=["ohif test", "cine"])
    series_uid = pydicom.uid.generate_uid(entropy_srcs=["ohif test", "cine", "series"])
    ds = us_multiframe_dataset(frames, study_uid=study_uid, series_uid=series_uid,
                               instance_number=1, spacing_cm=SPACING_MM / 10,
                               patient_id="OHIF-cine")
    source = root / "cine" / "IM1.dcm"
    source.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(source, enforce_file_format=True)
    settings = Settings()
    settings.storage.fsync = False
    studies, _ = collect_studies([source])
    done = process_study(study_uid, studies[study_uid], root / "results",
                         load_tasks(settings), settings)
    (overlay,) = done.outputs.overlay
    assert int(pydicom.dcmread(overlay, stop_before_pixels=True).NumberOfFrames) == 3
    _push(orthanc, [source, *done.outputs.all])
    out = ARTIFACTS / "cine"
    facts = _drive(server, source, out, "source,overlay")
    assert re.search(r"\b1\s*/\s*3\b", facts["steps"]["overlay"]["viewportText"]), \
        facts["steps"]["overlay"]["viewportText"]
    shot = np.asarray(Image.open(out / "overlay.png").convert("RGB")).astype(int)
    green = (shot[..., 1] > 180) & (shot[..., 0] < 90) & (shot[..., 2] < 90)
    assert green.sum() > 50  # frame 1's lesion outline, drawn by OHIF from the cine object


def test_mammography_study_in_ohif(viewer):
    """A four-view MG study with the density model's SR, Grad-CAM overlays and PDF: OHIF opens
    the mammograms, loads the SR, shows an overlay with the heat map and embeds the PDF."""
    root, orthanc, server = viewer
    from radlens.tasks.mammo_density.dicom import write_mammo_study
    from radlens.tasks.mammo_density.phantoms import generate

    views = list(generate(1, 11, size=256))[0]
    sources = write_mammo_study(root / "mammo", views, uid_seed="ohif mammo", synthesized=False)
    settings = Settings()
    settings.storage.fsync = False
    studies, _ = collect_studies(sources)
    (uid,) = studies
    done = process_study(uid, studies[uid], root / "results", load_tasks(settings), settings)
    assert len(done.outputs.overlay) == 4 and not done.outputs.seg
    _push(orthanc, [*sources, *done.outputs.all])
    out = ARTIFACTS / "mammo"
    facts = _drive(server, sources[0], out, "source,sr,overlay,pdf")
    assert not [e for e in facts["consoleErrors"] if "IMAGE_LOAD" in e], facts["consoleErrors"]
    image = facts["steps"]["source"]["image"]
    assert image is not None and image["rows"] == 256
    shot = np.asarray(Image.open(out / "source.png").convert("L")).astype(int)
    box = _image_box(image, shot.shape)
    assert (shot[box] > 60).mean() > 0.2, "the mammogram is not drawn"
    assert facts["steps"]["sr"]["hydrated"]
    overlay = np.asarray(Image.open(out / "overlay.png").convert("RGB")).astype(int)
    heat = (overlay[..., 0] > 150) & (overlay[..., 2] < 100)  # inferno's orange and yellow
    assert heat.sum() > 200, "no Grad-CAM heat drawn"
    fetched = (out / "pdf-from-ohif.pdf").read_bytes()
    assert fetched.rstrip(b"\0") == (done.findings_path.parent / "report.pdf").read_bytes()


def _sampled(png: Path, image: dict) -> np.ndarray:
    """The screenshot's colour at each image pixel's centre (rows x columns x RGB)."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    (x0, y0), (x1, y1) = image["topLeft"], image["bottomRight"]
    rows, columns = image["rows"], image["columns"]
    xs = np.clip(np.floor(x0 + (np.arange(columns) + 0.5) * (x1 - x0) / columns).astype(int),
                 0, rgb.shape[1] - 1)
    ys = np.clip(np.floor(y0 + (np.arange(rows) + 0.5) * (y1 - y0) / rows).astype(int),
                 0, rgb.shape[0] - 1)
    return rgb[ys[:, None], xs[None, :]]


def test_dermoscopy_photograph_in_ohif(viewer):
    """A dermoscopic photograph (RGB; VL Photographic, which OHIF displays) read by a small
    dermoscopy model trained here: OHIF opens the colour photograph and draws the SEG's
    segment over it where the mask is and nowhere else (the photograph is itself in colour,
    so what the SEG adds is the change from the photograph alone). The SR, overlay and PDF
    are the other tests' (the writers are shared). The model trains for two epochs: its mask
    may well be wrong, and this test judges the viewer's drawing of it, not the model."""
    from tests.helpers import radlens_cli, train_small_dermoscopy_model

    root, orthanc, server = viewer
    (root / "derm").mkdir()
    _, model, trained = train_small_dermoscopy_model(root / "derm")
    assert trained.returncode == 0, trained.stderr
    photographs = root / "derm-study"
    made = radlens_cli("phantoms", "--task", "dermoscopy", "--out", str(photographs), "--n",
                       "12", "--size", "160", "--seed", "5", "--dicom")
    assert made.returncode == 0, made.stderr
    # VL Photographic (XC): OHIF 3.13 lists no Dermoscopic Photography Image Storage among
    # the SOP classes it displays (docs/dermoscopy.md).
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True)
               for p in sorted((photographs / "dicom").glob("*/*.dcm"))}
    source = next(p for p, h in headers.items() if h.Modality == "XC"
                  and not h.file_meta.TransferSyntaxUID.is_compressed)
    settings = Settings()
    settings.storage.fsync = False
    settings.dermoscopy.enabled, settings.dermoscopy.weights = True, str(model)
    settings.dermoscopy.abstain = False
    studies, _ = collect_studies([source])
    (uid,) = studies
    done = process_study(uid, studies[uid], root / "results", load_tasks(settings), settings)
    assert done.outputs.seg and done.outputs.overlay and done.outputs.pdf
    _push(orthanc, [source, *done.outputs.all])
    out = ARTIFACTS / "dermoscopy"
    facts = _drive(server, source, out, "source,photo,seg")
    assert not [e for e in facts["consoleErrors"] if "IMAGE_LOAD" in e], facts["consoleErrors"]
    assert not [t for t in facts["steps"]["seg"]["toasts"] if "wrong" in t], facts["steps"]

    seg = hd.seg.segread(done.outputs.seg[0])
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    lesion = seg.get_pixels_by_source_instance([ds.SOPInstanceUID],
                                               skip_overlap_checks=True)[0].any(axis=-1)
    assert 0.01 < lesion.mean() < 0.6, "the model's lesion is not a lesion-sized region"
    before, after = facts["steps"]["photo"]["image"], facts["steps"]["seg"]["image"]
    assert before is not None and after is not None
    assert (before["rows"], before["columns"]) == lesion.shape == (ds.Rows, ds.Columns)
    photograph = _sampled(out / "source.png", before)
    assert photograph.std() > 10, "the photograph is not drawn"
    assert (np.abs(photograph[..., 0] - photograph[..., 2]) > 20).mean() > 0.3, \
        "the photograph is not drawn in colour"
    tinted = np.abs(_sampled(out / "seg.png", after) - photograph).sum(axis=-1) > 40
    near = ndimage.binary_dilation(lesion, iterations=2)
    core = ndimage.binary_erosion(lesion, iterations=2)
    assert tinted.sum() > 0.5 * lesion.sum(), "no SEG overlay drawn"
    assert (tinted & near).sum() / tinted.sum() >= 0.9  # nothing else tinted
    assert (tinted & core).sum() / max(1, core.sum()) >= 0.8  # the lesion is covered
    assert facts["steps"]["seg"]["segments"] == [1]
