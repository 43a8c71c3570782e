"""Tasks as plug-ins: the registry (built-in tasks, entry points, a broken plug-in), findings
files from before tasks, routing over several tasks, and a series read as a volume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from radlens.agent.routing import ImageFacts, Router
from radlens.config import RoutingRule, RoutingSettings
from radlens.findings import StudyFindings
from radlens.models.scope import ModelScope
from radlens.tasks import registry
from radlens.tasks.base import TaskError
from tests.helpers import ct_slice

US = "1.2.840.10008.5.1.4.1.1.6.1"


def test_the_built_in_tasks_come_first_and_an_unknown_name_says_what_there_is():
    names = [task.name for task in registry.all_tasks()]
    assert names[:2] == ["breast_us", "mammo_density"]
    assert {task.origin for task in registry.all_tasks()[:2]} == {"built-in"}
    with pytest.raises(TaskError, match="no task 'thyroid'.*breast_us, mammo_density"):
        registry.get_task("thyroid")


def test_a_broken_plugin_is_left_out_with_the_reason(tmp_path, monkeypatch):
    """Entry points are read from installed distributions' metadata (importlib.metadata): one
    whose module does not import, and one naming a built-in task's name, are refused, and the
    rest of the installation works."""
    site = tmp_path / "site"
    for name, target in (("broken", "no_such_module:TASK"),
                         ("impostor", "radlens.tasks.mammo_density:TASK")):
        info = site / f"radlens_{name}-1.0.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: radlens-{name}\n"
                                       "Version: 1.0\n")
        (info / "entry_points.txt").write_text(f"[radlens.tasks]\n{name} = {target}\n")
    monkeypatch.syspath_prepend(str(site))
    registry.reload()
    try:
        problems = registry.problems()
        assert any("'broken'" in p and "ModuleNotFoundError" in p for p in problems), problems
        assert any("'impostor'" in p and "taken by built-in" in p for p in problems), problems
        assert [t.name for t in registry.all_tasks()] == ["breast_us", "mammo_density",
                                                          "dermoscopy"]
    finally:
        monkeypatch.undo()
        registry.reload()


def test_findings_from_before_tasks_read_as_they_are_now():
    """Schema 1 kept the density reading beside the frame model's and the per-breast result
    on the study; both land where tasks file them, and the delivery rules see the task."""
    from radlens.agent.delivery import StudySource

    reading = {"model": {"name": "radlens-density", "version": "1", "architecture": "x"},
               "category": "C", "probabilities": {"A": 0.1, "B": 0.1, "C": 0.7, "D": 0.1},
               "laterality": "L", "view": "CC",
               "attention": {"tissue": 0.8, "artifacts": 0.1, "outside": 0.1},
               "attention_on_artifact": False, "ood_score": 3.0, "maps_file": None}
    image = {"ref": {"study_instance_uid": "1.2", "series_instance_uid": "1.2.1",
                     "sop_instance_uid": "1.2.1.1",
                     "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.2"},
             "modality": "MG", "photometric_interpretation": "MONOCHROME2",
             "transfer_syntax_uid": "1.2.840.10008.1.2.1", "rows": 64, "columns": 64,
             "frames": 1, "channels": 1, "spacing": None, "predictions": [], "abstained": [],
             "density": reading, "route": "body part BREAST is in scope", "not_analysed": None}
    frame = {"frame": 0, "predicted_class": "benign",
             "class_probabilities": {"normal": 0.1, "benign": 0.8, "malignant": 0.1},
             "lesion_pixels": {"benign": 40, "malignant": 0}}
    ultrasound = {**image, "ref": {**image["ref"], "sop_instance_uid": "1.2.1.2",
                                   "sop_class_uid": US},
                  "modality": "US", "density": None, "predictions": [frame]}
    lesion_model = {"name": "radlens-unet-phantom", "version": "1", "architecture": "unet"}
    stored = {"schema_version": 1, "study_instance_uid": "1.2", "job_id": 3, "revision": 1,
              "radlens_version": "0.1.0", "model": lesion_model,
              "images": [image, ultrasound], "skipped": [],
              "breast_density": {"left": "C", "right": None, "study": "C", "images": 1,
                                 "attention_warnings": 0}}
    findings = StudyFindings.model_validate_json(json.dumps(stored))
    (analysis,) = findings.images[0].analyses
    assert analysis.task == "mammo_density" and analysis.model_dump()["category"] == "C"
    assert findings.summaries["mammo_density"].model_dump()["study"] == "C"
    assert findings.tasks_run == ["mammo_density", "breast_us"]
    (frames,) = findings.images[1].analyses  # the lesion model's, with the study's model
    assert frames.task == "breast_us" and frames.model.name == "radlens-unet-phantom"
    assert [p.predicted_class for p in findings.images[1].predictions] == ["benign"]
    from radlens.tasks.mammo_density import TASK

    (typed,) = TASK.readings(findings.images[0])
    assert typed.view_label == "L CC" and TASK.summary(findings).left == "C"
    assert StudySource.tasks_of(stored) == {"mammo_density", "breast_us"}
    rewritten = StudyFindings.model_validate_json(findings.model_dump_json())
    assert rewritten.images[0].analyses[0].model_dump() == analysis.model_dump()


def _scope(body_part: str, modality: str = "US") -> ModelScope:
    return ModelScope.model_validate({
        "modalities": [modality], "body_parts": [body_part],
        "anatomic_regions": [{"value": "1", "meaning": body_part}], "sop_classes": [US],
        "photometric_interpretations": ["MONOCHROME2"], "intended_use": "tests"})


def _facts(body_part: str) -> ImageFacts:
    return ImageFacts(modality="US", body_part=body_part, anatomic_region_codes=(),
                      sop_class_uid=US, photometric="MONOCHROME2", descriptions="",
                      rows=256, columns=256, bits_stored=8)


def test_several_tasks_may_read_one_image_and_rules_name_tasks():
    scopes = {"breast_us": _scope("BREAST"), "elastography": _scope("BREAST"),
              "thyroid": _scope("THYROID"), "chest_ct": _scope("CHEST", modality="CT")}
    both = Router(RoutingSettings(), scopes).route(_facts("BREAST"))
    assert both.tasks == ("breast_us", "elastography")
    assert both.reason == "body part BREAST is in scope"
    rules = RoutingSettings(rules=[
        RoutingRule(name="research", calling_ae="LAB", task=["elastography", "chest_ct"]),
        RoutingRule(name="old style", calling_ae="OLD", model="default"),
        RoutingRule(name="anything in scope", calling_ae="ANY")])
    router = Router(rules, scopes)
    lab = router.route(_facts("BREAST"), "LAB")
    assert lab.tasks == ("elastography",)  # a CT model: outside its scope, never widened
    # A rule decides about anatomy: the thyroid model may read what the lab says is thyroid.
    thyroid = RoutingSettings(rules=[RoutingRule(name="lab", calling_ae="LAB", task="thyroid")])
    assert Router(thyroid, scopes).route(_facts("BREAST"), "LAB").tasks == ("thyroid",)
    assert router.route(_facts("BREAST"), "OLD").tasks == ("breast_us",)
    assert router.route(_facts("BREAST"), "ANY").tasks == ("breast_us", "elastography")
    ct = ImageFacts(modality="CT", body_part="CHEST", anatomic_region_codes=(),
                    sop_class_uid=US, photometric="MONOCHROME2", descriptions="")
    refused = router.route(ct, "OLD")
    assert not refused.analyse and "outside that model's scope: modality CT" in refused.reason


def _slice(folder: Path, study: str, series: str, z: float, number: int) -> Path:
    return ct_slice(folder / f"slice{number}.dcm", np.full((8, 8), number, dtype=np.uint16),
                    study=study, series=series, frame_of_reference=study + ".9", number=number,
                    z=z, pixel_spacing=(0.5, 0.5), slice_thickness=2.0)


def test_a_series_is_read_as_a_volume_in_its_spatial_order(tmp_path):
    """highdicom builds the volume: slices sorted along their normal whatever order they
    came in, spacing from Pixel Spacing and the slice positions."""
    from radlens.agent.pipeline import read_volume
    from radlens.agent.queue import JobInstance
    from radlens.dicom_io import pixels

    study, series = generate_uid(), generate_uid()
    paths = [_slice(tmp_path, study, series, z, n) for n, z in ((1, 4.0), (2, 0.0), (3, 2.0))]
    instances = [JobInstance(sop_instance_uid=str(pixels.read_dataset(p).SOPInstanceUID),
                             sop_class_uid=CTImageStorage, series_instance_uid=series,
                             transfer_syntax_uid=ExplicitVRLittleEndian, path=p,
                             calling_aet="CT1") for p in paths]
    infos = [pixels.describe(pixels.read_dataset(p)) for p in paths]
    volume = read_volume(instances, infos)
    assert volume.spacing_mm == pytest.approx((2.0, 0.5, 0.5))
    values = [int(volume.volume.array[i, 0, 0]) for i in range(3)]
    by_uid = {info.ref.sop_instance_uid: int(pixels.read_dataset(p).InstanceNumber)
              for info, p in zip(infos, paths, strict=True)}
    assert values == [by_uid[uid] for uid in volume.sources]  # the map goes back slice by slice
    assert sorted(values) == [1, 2, 3] and values in ([2, 3, 1], [1, 3, 2])
    assert [info.ref.sop_instance_uid for info in volume.infos] == list(volume.sources)


def test_a_series_with_a_missing_slice_is_refused_before_its_pixels_are_read(tmp_path):
    from radlens.agent.pipeline import read_volume
    from radlens.agent.queue import JobInstance
    from radlens.dicom_io import pixels
    from radlens.dicom_io.volumes import SeriesRefused

    study, series = generate_uid(), generate_uid()
    paths = [_slice(tmp_path, study, series, z, n)
             for n, z in ((1, 0.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0))]
    instances = [JobInstance(sop_instance_uid=str(pixels.read_dataset(p).SOPInstanceUID),
                             sop_class_uid=CTImageStorage, series_instance_uid=series,
                             transfer_syntax_uid=ExplicitVRLittleEndian, path=p,
                             calling_aet="CT1") for p in paths]
    infos = [pixels.describe(pixels.read_dataset(p)) for p in paths]
    with pytest.raises(SeriesRefused, match="missing slices: 1 absent between 4.00 and 8.00"):
        read_volume(instances, infos)


def test_a_series_task_reads_only_the_series_its_card_selects(tmp_path):
    """A phantom brain study (localiser, T2, T1, T1 after contrast): a scope selecting T1
    spin echo after contrast takes series 4 alone and says why each other is not read."""
    import pydicom
    from pydicom.uid import MRImageStorage

    from radlens.tasks.brain_mri import phantoms
    from radlens.tasks.brain_mri.dicom import write_brain_study

    case = phantoms.make_case(9, 5, size=32, label="pituitary")  # thick slices
    files = write_brain_study(tmp_path, case, uid_seed="routing")
    scope = ModelScope.model_validate({
        "modalities": ["MR"], "body_parts": ["HEAD", "BRAIN"],
        "anatomic_regions": [{"value": "12738006", "meaning": "Brain"}],
        "sop_classes": [MRImageStorage], "photometric_interpretations": ["MONOCHROME2"],
        "series": {"contrast": "with", "scanning_sequences": ["SE", "GR", "IR"],
                   "max_echo_time_ms": 30, "description": "t1"},
        "intended_use": "tests"})
    router = Router(RoutingSettings(), {"brain": scope})
    decisions = {}
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        decisions.setdefault(int(ds.SeriesNumber), set()).add(
            router.route(ImageFacts.from_dataset(ds)).reason)
    assert decisions[4] == {"body part HEAD is in scope"}
    assert decisions[1] == {"outside the model's scope: image type LOCALIZER (not a series "
                            "the model reads)"}
    assert decisions[2] == {"outside the model's scope: no contrast agent stated (the model "
                            "reads series after contrast)"}
    assert decisions[3] == decisions[2]
    t2 = ImageFacts(modality="MR", body_part="HEAD", anatomic_region_codes=(),
                    sop_class_uid=MRImageStorage, photometric="MONOCHROME2", descriptions="",
                    contrast_agent="Gadobutrol", scanning_sequence=("SE",), echo_time_ms=100.0,
                    series_description="t2_tse_tra")
    assert router.route(t2).reason == ("outside the model's scope: echo time 100 ms (the model "
                                       "reads echo times up to 30 ms)")
    flair = ImageFacts(modality="MR", body_part="HEAD", anatomic_region_codes=(),
                       sop_class_uid=MRImageStorage, photometric="MONOCHROME2", descriptions="",
                       contrast_agent="Gadobutrol", scanning_sequence=("IR",), echo_time_ms=9.0,
                       series_description="flair_post")
    assert "series description 'flair_post' does not match 't1'" in router.route(flair).reason
    with pytest.raises(ValueError, match="not a regular expression"):
        ModelScope.model_validate({**scope.model_dump(), "series": {"description": "t1("}})
