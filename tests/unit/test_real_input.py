"""What real senders put in headers and pixel data, and how each stage copes: a mutated image
gets a reason, never an exception the study dies of; a sloppy header is made conformant."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from radlens.agent.routing import ImageFacts, ModelScope, Router
from radlens.config import RoutingRule, RoutingSettings
from radlens.dicom_io.conformance import MAX_SEQUENCE_DEPTH, conformant_header
from radlens.dicom_io.pixels import decode_dataset, describe, physical_spacing
from radlens.errors import UnsupportedImageError
from radlens.models.ood import OodDetector
from radlens.tasks.breast_us.dicom import us_instance
from radlens.tasks.breast_us.scope import BREAST_ULTRASOUND_SCOPE


def _us() -> Dataset:
    return us_instance(study_uid="1.2", series_uid="1.3", instance_number=1, rows=64,
                       columns=64, spacing_cm=0.02)


def _raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> None:
    tag = Tag(keyword)
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, True, True)


# --- pixel data that does not fit its header: a reason, never a crash -----------------------

def _mutations() -> dict[str, Dataset]:
    cases = {}
    ds = _us()
    ds.PixelData = ds.PixelData * 2
    cases["double-length PixelData"] = ds
    ds = _us()
    ds.NumberOfFrames = 3
    cases["NumberOfFrames disagrees with the data"] = ds
    ds = _us()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    cases["BitsAllocated 1"] = ds
    ds = _us()
    ds.RescaleSlope, ds.RescaleIntercept = "NaN", "0"
    cases["RescaleSlope NaN"] = ds
    ds = _us()
    ds.RescaleSlope, ds.RescaleIntercept = "1", "inf"
    cases["RescaleIntercept infinite"] = ds
    ds = _us()
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.RedPaletteColorLookupTableDescriptor = [256, 0, 8]
    ds.GreenPaletteColorLookupTableDescriptor = [256, 0, 8]
    ds.BluePaletteColorLookupTableDescriptor = [256, 0, 8]
    ds.RedPaletteColorLookupTableData = bytes(10)  # shorter than its descriptor
    ds.GreenPaletteColorLookupTableData = bytes(256)
    ds.BluePaletteColorLookupTableData = bytes(256)
    cases["broken palette"] = ds
    ds = _us()
    ds.Rows = 0
    cases["Rows 0"] = ds
    ds = _us()
    ds.SamplesPerPixel = 3
    cases["SamplesPerPixel 3 with MONOCHROME2"] = ds
    return cases


@pytest.mark.parametrize("name", list(_mutations()))
def test_a_mutated_image_gets_a_reason(name):
    with pytest.raises(UnsupportedImageError) as raised:
        decode_dataset(_mutations()[name])
    assert str(raised.value)


def test_an_unreadable_rescale_slope_is_ignored_as_pydicom_does():
    """pydicom's modality LUT skips a RescaleSlope it cannot read: the stored values come
    out unchanged and finite, which for an ultrasound frame is the image itself."""
    ds = _us()
    _raw(ds, "RescaleSlope", "DS", b"abc ")
    decoded = decode_dataset(ds)
    assert np.isfinite(decoded.pixels).all()
    assert np.array_equal(decoded.pixels[0, :, :, 0], _us().pixel_array.astype(np.float32))


def test_nan_and_unknown_vr_in_ultrasound_regions_leave_spacing_unknown():
    ds = _us()
    ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaX = float("nan")
    assert physical_spacing(ds) is None
    ds = _us()
    region = ds.SequenceOfUltrasoundRegions[0]
    tag = Tag(0x0018, 0x602C)  # PhysicalDeltaX, stored with a VR pydicom does not know
    region[tag] = RawDataElement(tag, "QL", 8, b"\x00" * 8, 0, True, True)
    assert physical_spacing(ds) is None
    assert describe(ds).spacing is None  # describing the image still works


# --- headers made conformant, one log line per fix ------------------------------------------

def test_sloppy_header_values_are_made_conformant(caplog):
    ds = Dataset()
    _raw(ds, "SpecificCharacterSet", "CS", b"ISO_IR 999")
    _raw(ds, "StudyTime", "TM", b"14:04:38")
    _raw(ds, "StudyDate", "DA", b"2001.02.03")
    _raw(ds, "PatientBirthDate", "DA", b"19700230")
    _raw(ds, "PatientWeight", "DS", b"heavy ")
    _raw(ds, "PatientSex", "CS", b"m ")
    _raw(ds, "StudyID", "SH", b"x" * 20)
    _raw(ds, "InstanceNumber", "IS", b"1A")
    _raw(ds, "PatientName", "PN", b"Doe^Jane")
    with caplog.at_level(logging.INFO, logger="radlens.dicom_io.conformance"):
        conformant_header(ds, source="1.2.3")
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.StudyTime == "140438" and ds.StudyDate == "20010203"
    assert ds.PatientBirthDate == ""  # type 2: emptied, not dropped
    assert "PatientWeight" not in ds and "InstanceNumber" not in ds
    assert ds.PatientSex == "M" and ds.StudyID == "x" * 16
    assert str(ds.PatientName) == "Doe^Jane"
    ours = [r for r in caplog.records if r.name == "radlens.dicom_io.conformance"]
    fixed = {r.radlens_ctx["attribute"] for r in ours}
    assert {"StudyTime", "StudyDate", "PatientBirthDate", "PatientWeight", "PatientSex",
            "StudyID", "InstanceNumber", "SpecificCharacterSet"} <= fixed
    assert all("Doe" not in r.getMessage() + str(r.radlens_ctx) for r in ours)


def test_deeply_nested_sequences_are_cut():
    ds = Dataset()
    item = ds
    for _ in range(40):
        child = Dataset()
        item.ReferencedImageSequence = [child]
        item = child
    conformant_header(ds)
    depth, item = 0, ds
    while "ReferencedImageSequence" in item:
        item = item.ReferencedImageSequence[0]
        depth += 1
    assert depth == MAX_SEQUENCE_DEPTH


# --- scope and routing ----------------------------------------------------------------------

SCOPE = ModelScope.model_validate(BREAST_ULTRASOUND_SCOPE)
SCOPES = {"breast_us": SCOPE}  # the lesion task alone


def _facts(**changes) -> ImageFacts:
    ds = _us()
    del ds.BodyPartExamined
    for key, value in changes.items():
        setattr(ds, key, value)
    return ImageFacts.from_dataset(ds)


def test_stated_body_part_outside_scope_is_not_analysed():
    decision = Router(RoutingSettings(), SCOPES).route(_facts(BodyPartExamined="HEART"))
    assert not decision.analyse
    assert decision.reason == "outside the model's scope: body part HEART"
    assert Router(RoutingSettings(), SCOPES).route(_facts(BodyPartExamined="BREAST")).analyse


def test_anatomic_region_code_decides_like_a_body_part():
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator = "76752008", "SCT"
    region.CodeMeaning = "Breast"
    assert Router(RoutingSettings(), SCOPES).route(_facts(AnatomicRegionSequence=[region])).analyse
    region.CodeValue, region.CodeMeaning = "80891009", "Heart"
    assert not Router(RoutingSettings(), SCOPES).route(
        _facts(AnatomicRegionSequence=[region])).analyse


def test_modality_sop_class_and_photometric_bound_every_rule():
    rules = RoutingSettings(rules=[RoutingRule(model="default")])  # matches everything
    router = Router(rules, SCOPES)
    assert router.route(_facts(Modality="CT")).reason == "outside the model's scope: modality CT"
    assert "SOP class" in router.route(_facts(SOPClassUID="1.2.840.10008.5.1.4.1.1.7")).reason


def test_first_matching_rule_wins_and_unstated_body_part_has_a_default():
    rules = RoutingSettings(rules=[
        RoutingRule(name="echo", description="echo|cardi", model="none"),
        RoutingRule(name="breast room", calling_ae="BREASTUS1"),
    ], unstated_body_part="skip")
    router = Router(rules, SCOPES)
    echo = router.route(_facts(StudyDescription="Echocardiogram"), "BREASTUS1")
    assert not echo.analyse and "'echo'" in echo.reason
    room = router.route(_facts(), "BREASTUS1")
    assert room.analyse and "'breast room'" in room.reason
    other = router.route(_facts(), "OTHER")
    assert not other.analyse and "unstated_body_part is 'skip'" in other.reason
    default = Router(RoutingSettings(), SCOPES).route(_facts(), "OTHER")
    assert default.analyse and "out-of-distribution check still applies" in default.reason


# --- the out-of-distribution score ----------------------------------------------------------

def test_ood_threshold_is_the_calibration_quantile(tmp_path):
    rng = np.random.default_rng(0)
    fit = rng.normal(size=(400, 8))
    calibration = rng.normal(size=(200, 8))
    detector = OodDetector.fit(fit, calibration, quantile=0.95)
    assert np.mean(detector.score(calibration) > detector.threshold) == pytest.approx(0.05,
                                                                                      abs=0.01)
    assert (detector.score(rng.normal(loc=6.0, size=(50, 8))) > detector.threshold).all()
    detector.save(tmp_path)
    loaded = OodDetector.load(tmp_path)
    assert loaded.threshold == detector.threshold
    assert np.allclose(loaded.score(calibration), detector.score(calibration))
    assert OodDetector.load(tmp_path / "missing") is None


# --- which frames of a clip get saliency ----------------------------------------------------

def _measured(index: int, suspicion: float, lesion: bool):
    from radlens.tasks.breast_us.analyser import _MeasuredFrame

    probabilities = np.array([1 - suspicion, suspicion, 0.0], dtype=np.float32)
    return _MeasuredFrame(index, probabilities, np.zeros((4, 4), np.float32),
                          np.zeros((4, 4), np.uint8), [],
                          ["lesion"] if lesion else [], None, None, None)


def test_explain_frames_bounds_saliency_on_long_clips():
    from radlens.tasks.breast_us.analyser import frames_to_explain

    clip = [_measured(0, 0.2, False), _measured(1, 0.9, True), _measured(2, 0.6, True),
            _measured(3, 0.95, False)]
    assert frames_to_explain(clip, "lesions", multiframe=True) == {1, 2}
    assert frames_to_explain(clip, "all", multiframe=True) == {0, 1, 2, 3}
    assert frames_to_explain(clip, 1, multiframe=True) == {1}  # lesion frames first
    assert frames_to_explain(clip, 3, multiframe=True) == {1, 2, 3}
    quiet = [_measured(0, 0.2, False), _measured(1, 0.4, False)]
    assert frames_to_explain(quiet, "lesions", multiframe=True) == {1}  # the most suspicious
    assert frames_to_explain(quiet[:1], "lesions", multiframe=False) == set()
