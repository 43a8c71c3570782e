"""Models that are not radlens's own, end to end: a site's task plug-in (a pip package declaring
a ``radlens.tasks`` entry point, built and installed here with a small network trained here)
and a MONAI bundle folder named in the configuration (the same kind of network, saved as the
bundle's weights), and a second bundle that reads a CT series as one volume. One agent runs them
without its own models; storescu sends a study whose thyroid series goes to the plug-in and
whose kidney series goes to the first bundle, then a CT study slice by slice for the volume
bundle, and a storescp archive gets each one's SEG and each study's SR, which dciodvfy accepts
and dsrdump reads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.helpers import (
    REPO,
    ct_slice,
    dciodvfy_errors,
    radlens_cli,
    require_tool,
    storescu,
    wait_for,
)

PLUGIN_SOURCE = REPO / "tests" / "plugins" / "phantom_nodules"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _scope(body_part: str, code: str, meaning: str) -> dict:
    return {"modalities": ["US"], "body_parts": [body_part],
            "anatomic_regions": [{"value": code, "scheme": "SCT", "meaning": meaning}],
            "sop_classes": [US_IMAGE], "photometric_interpretations": ["MONOCHROME2"],
            "geometry": {"frames": "single", "min_size": 32, "max_size": 4096,
                         "min_bits_stored": 8, "max_bits_stored": 16},
            "intended_use": "Tests only: a network trained for a few steps on phantoms."}


def _trained_state() -> dict:
    """MONAI's UNet trained for 120 steps on 64 x 64 phantoms to find their lesion: a real
    model, small and quick (2 s on a CPU), that finds something on the images sent."""
    import torch
    from monai.networks.nets import UNet

    from radlens.tasks.breast_us.phantoms import make_phantom

    torch.manual_seed(0)
    phantoms = [make_phantom(7, i, size=64) for i in range(48)]
    images = torch.tensor(np.stack([p.image / 255.0 for p in phantoms])[:, None],
                          dtype=torch.float32)
    masks = torch.tensor(np.stack([p.mask > 0 for p in phantoms]).astype(np.int64))
    net = UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(8, 16, 32),
               strides=(2, 2), num_res_units=0)
    optimiser = torch.optim.Adam(net.parameters(), 1e-2)
    weight = torch.tensor([1.0, 8.0])
    for _ in range(120):
        batch = torch.randint(0, len(phantoms), (8,))
        loss = torch.nn.functional.cross_entropy(net(images[batch]), masks[batch],
                                                 weight=weight)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.state_dict()


def _install_plugin(tmp_path: Path, state: dict) -> Path:
    """The plug-in package with its weights and card, built and installed into a folder of
    its own (pip --target), which the agent gets on its PYTHONPATH."""
    import torch

    source = tmp_path / "plugin-source"
    shutil.copytree(PLUGIN_SOURCE, source)
    weights = source / "radlens_phantom_nodules" / "weights"
    weights.mkdir()
    torch.save(state, weights / "model.pt")
    (weights / "card.json").write_text(json.dumps({
        "name": "phantom-nodules", "version": "2026.12.0", "architecture": "MONAI UNet 8-16-32",
        "scope": _scope("THYROID", "69748006", "Thyroid structure")}))
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(site), str(source)],
        capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    assert list(site.glob("radlens_phantom_nodules-0.1.0.dist-info/entry_points.txt"))
    return site


def _write_bundle(folder: Path, state: dict, metadata: dict, inference: dict) -> Path:
    """A bundle folder in the MONAI Model Zoo's layout: configs/metadata.json,
    configs/inference.json and the network's weights as models/model.pt."""
    import torch

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    torch.save(state, folder / "models" / "model.pt")
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    return folder


def _bundle(tmp_path: Path, state: dict) -> Path:
    """A bundle folder in the MONAI Model Zoo's layout, its network saved as its weights."""
    return _write_bundle(tmp_path / "phantom_cysts_bundle", state, {
        "name": "Phantom cysts", "version": "0.1.0",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 1,
                                 "spatial_shape": [64, 64]}},
            "outputs": {"pred": {"type": "image", "num_channels": 2,
                                 "channel_def": {"0": "background", "1": "cyst"}}}}}, {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "UNet", "spatial_dims": 2, "in_channels": 1,
                        "out_channels": 2, "channels": [8, 16, 32], "strides": [2, 2],
                        "num_res_units": 0},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},  # radlens hands pixels in memory
            {"_target_": "ScaleIntensityd", "keys": "image"},
            {"_target_": "Resized", "keys": "image", "spatial_size": [64, 64]}]},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred",  # radlens writes its own outputs
             "output_dir": "$@bundle_root + '/eval'"}]},
    })


def _study(folder: Path) -> list[Path]:
    """One study: two thyroid images (one series) and a kidney image (another), each a phantom
    with a lesion, as an ultrasound unit would send them."""
    from radlens.tasks.breast_us.dicom import us_dataset
    from radlens.tasks.breast_us.phantoms import make_phantom

    folder.mkdir()
    study = generate_uid()
    paths = []
    for number, (body_part, series) in enumerate(
            [("THYROID", "thyroid"), ("THYROID", "thyroid"), ("KIDNEY", "kidney")], start=1):
        phantom = make_phantom(21, number, size=128, label="malignant")
        ds = us_dataset(phantom.image, study_uid=study,
                        series_uid=generate_uid(entropy_srcs=[study, series]),
                        instance_number=number, spacing_cm=0.02, patient_id="PLUGIN1")
        ds.BodyPartExamined = body_part
        ds.SeriesDescription = f"phantom {series}"
        paths.append(folder / f"IM{number}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.fixture(scope="module")
def trained() -> dict:
    return _trained_state()


def test_a_plugin_package_and_monai_bundles_read_studies_sent_with_storescu(
        server_factory, archive, tmp_path, trained):
    site = _install_plugin(tmp_path, trained)
    bundle = _bundle(tmp_path, trained)
    bundles = [{"name": "phantom_cysts", "path": str(bundle),
                "scope": _scope("KIDNEY", "64033007", "Kidney structure")},
               {"name": "phantom_spheres", "unit": "series", "scope": CT_SCOPE,
                "path": str(_volume_bundle(tmp_path, _trained_3d_state()))}]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site),
                                                       os.environ.get("PYTHONPATH")])),
           "RADLENS_MODEL__ENABLED": "false", "RADLENS_BUNDLES": json.dumps(bundles)}

    # What the installation has, and where each came from.
    listed = radlens_cli("models", env={**os.environ, **env, "COLUMNS": "400"})
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[1]: line for line in listed.stdout.splitlines()
             if line.startswith("│ ") and len(line.split()) > 2}
    assert "radlens-phantom-nodules 0.1.0" in lines["phantom_nodules"]
    assert "bundle" in lines["phantom_cysts"] and bundle.name in listed.stdout
    assert "built-in" in lines["breast_us"] and "built-in" in lines["mammo_density"]

    files = _study(tmp_path / "study")
    routed = radlens_cli("route", *map(str, files), env={**os.environ, **env, "COLUMNS": "400"})
    assert routed.returncode == 0, routed.stderr
    by_file = {Path(line.split()[1]).name: line for line in routed.stdout.splitlines()
               if ".dcm" in line}
    assert "phantom_nodules (phantom-nodules)" in by_file["IM1.dcm"]
    assert "phantom_cysts (Phantom cysts)" in by_file["IM3.dcm"]

    server = server_factory(**env, RADLENS_DESTINATIONS=json.dumps([{
        "name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": archive.port}]),
        RADLENS_OUTBOX__POLL_INTERVAL_S="0.2").start()
    sent = storescu(server.port, files)
    assert sent.returncode == 0 and "Failed" not in sent.stderr, sent.stderr
    wait_for(lambda: len(server.jobs_done()) == 1, 180, "the study to be processed")
    assert server.jobs_done()[0]["state"] == "done", server.log()[-3000:]
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    findings = server.findings(study_uid)
    readings = {image["ref"]["sop_instance_uid"][-4:]: image["analyses"]
                for image in findings["images"]}
    assert [len(r) for r in readings.values()] == [1, 1, 1]
    tasks = sorted(a[0]["task"] for a in readings.values())
    assert tasks == ["phantom_cysts", "phantom_nodules", "phantom_nodules"]
    for image in findings["images"]:
        (reading,) = image["analyses"]
        assert reading["labels"] and reading["labels"][0]["area_mm2"] > 0, reading
        assert reading["ood_check"] is False

    wait_for(lambda: server.query("SELECT COUNT(*) FROM outbox WHERE state != 'sent'")[0][0]
             == 0 and server.query("SELECT COUNT(*) FROM outbox")[0][0] > 0, 60,
             "every output to reach the archive")
    returned = {path: pydicom.dcmread(path, stop_before_pixels=True) for path in archive.files()}
    segs = [path for path, ds in returned.items() if ds.SOPClassUID == SEG_STORAGE]
    (sr,) = [path for path, ds in returned.items() if ds.Modality == "SR"]
    assert len(segs) == 3  # a SEG per image read, each with its task's label
    labels = sorted(str(returned[path].SegmentSequence[0].SegmentLabel) for path in segs)
    assert labels == ["cyst", "nodule", "nodule"]
    for path in returned:
        errors = dciodvfy_errors(path)
        assert errors == [], (path.name, errors)
    tree = subprocess.run([require_tool("dsrdump"), "+U8", "+Pl", "+Pc", str(sr)],
                          capture_output=True, text=True, timeout=60).stdout
    assert tree.count('(52988006,SCT,"Lesion")') >= 2  # the plug-in's coded label
    assert '(85756007,SCT,"Tissue")' in tree  # the bundle's label, which states no code
    assert tree.count('(121191,DCM,"Referenced Segment")') == 3
    for name in ("phantom_nodules (phantom-nodules 2026.12.0)",
                 "phantom_cysts (Phantom cysts 0.1.0)"):
        assert f"{name} has no out-of-distribution check" in " ".join(tree.split())
    assert ("Model phantom-nodules 2026.12.0: its card does not state what it was trained on."
            in " ".join(tree.split()))

    _a_ct_series_is_read_as_one_volume(server, archive, tmp_path)


CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
CT_SHAPE = (8, 32, 32)  # slices, rows, columns
CT_SPACING = (2.5, 0.8, 0.8)  # mm: slice spacing, row, column


def _sphere_volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A soft-tissue block (HU around 40) with one bright sphere (HU around 220) of random
    centre and radius, and its mask."""
    z, y, x = np.indices(CT_SHAPE)
    centre = rng.uniform((2.5, 10, 10), (5.5, 22, 22))
    radius = rng.uniform(5.0, 8.0)  # mm
    inside = (((z - centre[0]) * CT_SPACING[0]) ** 2 + ((y - centre[1]) * CT_SPACING[1]) ** 2
              + ((x - centre[2]) * CT_SPACING[2]) ** 2) <= radius ** 2
    hu = rng.normal(40, 15, CT_SHAPE) + 180 * inside
    return hu, inside


def _trained_3d_state() -> dict:
    """MONAI's 3-D UNet trained for 40 steps (about a second) to find the sphere, on volumes
    scaled as the bundle's preprocessing scales them (HU -200 to 400 to 0 to 1)."""
    import torch
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    rng = np.random.default_rng(3)
    volumes = [_sphere_volume(rng) for _ in range(24)]
    images = torch.tensor(np.stack([np.clip((hu + 200) / 600, 0, 1) for hu, _ in volumes])
                          [:, None], dtype=torch.float32)
    masks = torch.tensor(np.stack([mask for _, mask in volumes]).astype(np.int64))
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8),
               strides=(2,), num_res_units=0)
    optimiser = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(40):
        batch = torch.randint(0, len(volumes), (4,))
        loss = torch.nn.functional.cross_entropy(net(images[batch]), masks[batch],
                                                 weight=torch.tensor([1.0, 4.0]))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.state_dict()


def _volume_bundle(tmp_path: Path, state: dict) -> Path:
    """A bundle that reads a CT series as one volume, labels in its metadata."""
    return _write_bundle(tmp_path / "phantom_spheres_bundle", state, {
        "name": "Phantom spheres", "version": "0.2.0",
        "data_source": "24 synthetic CT volumes with one sphere each, made by the test",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "num_channels": 1,
                                 "spatial_shape": list(CT_SHAPE)}},
            "outputs": {"pred": {"type": "image", "num_channels": 2,
                                 "channel_def": {"0": "background", "1": "sphere"}}}}}, {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1,
                        "out_channels": 2, "channels": [4, 8], "strides": [2],
                        "num_res_units": 0},
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -200, "a_max": 400,
             "b_min": 0.0, "b_max": 1.0, "clip": True}]},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
    })


def _ct_series(folder: Path) -> tuple[list[Path], np.ndarray]:
    """A CT series of one phantom volume, a file per slice, written in a shuffled order (as
    scanners and archives send them); returns the files and the sphere's mask."""
    folder.mkdir()
    rng = np.random.default_rng(11)
    hu, mask = _sphere_volume(rng)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for index in rng.permutation(CT_SHAPE[0]):
        paths.append(ct_slice(
            folder / f"CT{index + 1}.dcm",
            np.clip(np.rint(hu[index] + 1024), 0, 4095).astype(np.uint16),
            study=study, series=series, frame_of_reference=frame_of_reference,
            number=int(index) + 1, z=float(index) * CT_SPACING[0],
            pixel_spacing=CT_SPACING[1:], slice_thickness=CT_SPACING[0],
            PatientName="Phantom^Spheres", PatientID="BUNDLE3D", PatientBirthDate="19700101",
            PatientSex="O", StudyDate="20261207", StudyTime="120000", AccessionNumber="A3D",
            StudyID="1", ReferringPhysicianName="", SeriesNumber=3,
            BodyPartExamined="ABDOMEN", SeriesDescription="phantom spheres",
            Manufacturer="radlens tests", ImageType=["ORIGINAL", "PRIMARY", "AXIAL"],
            BitsStored=12, HighBit=11, RescaleIntercept=-1024, RescaleType="HU", KVP=120,
            AcquisitionNumber=1))
    return paths, mask


CT_SCOPE = {"modalities": ["CT"], "body_parts": ["ABDOMEN"],
            "anatomic_regions": [{"value": "818981001", "scheme": "SCT", "meaning": "Abdomen"}],
            "sop_classes": [CT_IMAGE], "photometric_interpretations": ["MONOCHROME2"],
            "geometry": {"frames": "single", "min_size": 16, "max_size": 1024,
                         "min_bits_stored": 12, "max_bits_stored": 16},
            "intended_use": "Tests only: a 3-D network trained for a few steps on phantoms."}


def _a_ct_series_is_read_as_one_volume(server, archive, tmp_path: Path) -> None:
    """A bundle with ``unit: series``: storescu sends a CT series slice by slice in a shuffled
    order; the bundle reads it once, as a volume with its geometry, and one SEG over the
    series (a frame per slice it covers, each referencing its slice) and an SR with the
    sphere's volume in mL come back to the archive, accepted by dciodvfy and read by
    dsrdump."""
    files, truth = _ct_series(tmp_path / "ct")
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    before = set(archive.files())
    sent = storescu(server.port, files)
    assert sent.returncode == 0 and "Failed" not in sent.stderr, sent.stderr

    def job() -> list:
        return [j for j in server.jobs_done() if j["study_instance_uid"] == study_uid]

    wait_for(lambda: len(job()) == 1, 180, "the series to be processed")
    assert job()[0]["state"] == "done", server.log()[-3000:]
    findings = server.findings(study_uid)
    assert len(findings["images"]) == CT_SHAPE[0]
    readings = [reading for image in findings["images"] for reading in image["analyses"]]
    assert {r["task"] for r in readings} == {"phantom_spheres"}
    assert len(readings) == CT_SHAPE[0] and len({r["volume"] for r in readings}) == 1
    (sphere,) = readings[0]["labels"]
    true_ml = truth.sum() * np.prod(CT_SPACING) / 1000
    assert sphere["name"] == "sphere" and 0.5 * true_ml < sphere["volume_ml"] < 2 * true_ml, \
        (sphere, true_ml)

    wait_for(lambda: any(pydicom.dcmread(path, stop_before_pixels=True).Modality == "SR"
                         for path in set(archive.files()) - before)
             and server.query("SELECT COUNT(*) FROM outbox WHERE state != 'sent'")[0][0] == 0,
             60, "every output to reach the archive")
    returned = {path: pydicom.dcmread(path) for path in set(archive.files()) - before}
    assert {str(ds.StudyInstanceUID) for ds in returned.values()} == {study_uid}
    (seg,) = [ds for ds in returned.values() if ds.SOPClassUID == SEG_STORAGE]
    (sr_path,) = [path for path, ds in returned.items() if ds.Modality == "SR"]
    assert str(seg.SegmentSequence[0].SegmentLabel) == "sphere"
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    referenced = {str(frame.DerivationImageSequence[0].SourceImageSequence[0]
                      .ReferencedSOPInstanceUID)
                  for frame in seg.PerFrameFunctionalGroupsSequence}
    assert referenced <= sources and len(referenced) >= 2  # the sphere spans several slices
    for path in returned:
        errors = dciodvfy_errors(path)
        assert errors == [], (path.name, errors)
    tree = " ".join(subprocess.run(
        [require_tool("dsrdump"), "+U8", "+Pl", "+Pc", str(sr_path)],
        capture_output=True, text=True, timeout=60).stdout.split())
    assert '(118565006,SCT,"Volume")' in tree and '(ml,UCUM,"milliliter")' in tree
    assert "phantom_spheres (Phantom spheres 0.2.0) has no out-of-distribution check" in tree
    assert ("Model Phantom spheres 0.2.0: Trained on 24 synthetic CT volumes with one sphere "
            "each, made by the test.") in tree  # the bundle metadata's data_source
