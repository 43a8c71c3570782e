"""The density model inside the agent: routing beside the lesion model, per-breast and
per-study categories, the narrative's facts and the grounding that guards them."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from radlens.agent.routing import ImageFacts, ModelScope, Router
from radlens.config import RoutingRule, RoutingSettings
from radlens.findings import ImageInfo, ImageRef, ModelRef, StudyFindings
from radlens.models.cards import model_folder
from radlens.reporting import grounding
from radlens.reporting.prompt import StudyFacts
from radlens.reporting.template import template_narrative
from radlens.tasks.breast_us.infer import DEFAULT_MODEL as LESION_WEIGHTS
from radlens.tasks.mammo_density.findings import AttentionShares, BreastDensity, DensityPrediction

DEFAULT_MODEL = "breast_us"  # the tasks, by the names routing rules and findings use
DENSITY_MODEL = "mammo_density"

BREAST_TOMOSYNTHESIS = "1.2.840.10008.5.1.4.1.1.13.1.3"
MODEL = ModelRef(name="radlens-density", version="test", architecture="DensityCLIP")


def _scopes() -> dict[str, ModelScope | None]:
    cards = {DEFAULT_MODEL: model_folder(LESION_WEIGHTS), DENSITY_MODEL: model_folder("density")}
    return {name: ModelScope.from_card(json.loads((folder / "card.json").read_text()))
            for name, folder in cards.items()}


@pytest.fixture(scope="module")
def mammogram(tmp_path_factory) -> Path:
    from radlens.tasks.mammo_density.dicom import write_mammo_study
    from radlens.tasks.mammo_density.phantoms import generate

    views = list(generate(1, 4, size=128))[0]
    return write_mammo_study(tmp_path_factory.mktemp("mg"), views, uid_seed="routing test",
                             synthesized=False)[0]


def _facts(path: Path, **changes: object) -> ImageFacts:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for key, value in changes.items():
        setattr(ds, key, value)
    return ImageFacts.from_dataset(ds)


def test_each_image_goes_to_the_model_built_for_it(mammogram):
    from tests.helpers import TEST_FILES

    router = Router(RoutingSettings(), _scopes())
    mg = router.route(_facts(mammogram))
    assert (mg.tasks, mg.reason) == ((DENSITY_MODEL,), "body part BREAST is in scope")
    unstated = router.route(_facts(mammogram, BodyPartExamined=""))
    assert unstated.tasks == (DENSITY_MODEL,)  # MG within its SOP classes: the density model
    heart = router.route(_facts(mammogram, BodyPartExamined="HEART", AnatomicRegionSequence=[]))
    assert not heart.analyse and heart.reason == "outside the model's scope: body part HEART"
    tomo = router.route(_facts(mammogram, SOPClassUID=BREAST_TOMOSYNTHESIS))
    assert not tomo.analyse and "SOP class Breast Tomosynthesis Image" in tomo.reason
    ct = router.route(_facts(TEST_FILES / "CT_small.dcm"))
    assert ct.reason == "outside the model's scope: modality CT"
    us = _facts(mammogram, Modality="US", SOPClassUID="1.2.840.10008.5.1.4.1.1.6.1",
                PhotometricInterpretation="MONOCHROME2")
    assert router.route(us).tasks == (DEFAULT_MODEL,)
    lesion_only = Router(RoutingSettings(), {DEFAULT_MODEL: _scopes()[DEFAULT_MODEL]})
    assert not lesion_only.route(_facts(mammogram)).analyse  # the density model not loaded


def test_a_rule_picks_a_model_but_never_widens_its_scope(mammogram):
    rules = RoutingSettings(rules=[
        RoutingRule(name="no mammo from the van", calling_ae="VAN", model="none"),
        RoutingRule(name="everything to density", model="density")])
    router = Router(rules, _scopes())
    assert not router.route(_facts(mammogram), "VAN").analyse
    assert router.route(_facts(mammogram), "ROOM").tasks == (DENSITY_MODEL,)
    us = _facts(mammogram, Modality="US", SOPClassUID="1.2.840.10008.5.1.4.1.1.6.1")
    refused = router.route(us, "ROOM")
    assert not refused.analyse
    assert "outside that model's scope: modality US" in refused.reason


def test_pixels_unlike_the_models_images_are_refused_whatever_the_header_says(mammogram):
    """The cards state the image geometry their models were built for: a multi-frame object,
    a thumbnail or an 8-bit capture that says MG BREAST is not a mammogram the density model
    can read, and the reason says which; the lesion model takes clips and 16-bit frames."""
    from tests.helpers import TEST_FILES

    router = Router(RoutingSettings(), _scopes())
    assert router.route(_facts(mammogram)).tasks == (DENSITY_MODEL,)  # 128 x 102, 12 bits stored
    clip = router.route(_facts(mammogram, NumberOfFrames=10))
    assert not clip.analyse
    assert clip.reason == ("outside the model's scope: multi-frame (10 frames; the model "
                           "reads single images)")
    small = router.route(_facts(mammogram, Rows=64, Columns=64))
    assert small.reason == ("outside the model's scope: matrix 64x64 (the model reads 96 to "
                            "6000 pixels a side)")
    capture = router.route(_facts(mammogram, BitsStored=8))
    assert capture.reason == "outside the model's scope: bits stored 8 (the model reads 10 to 16)"
    # pydicom's 64 x 64 MR slice, its header rewritten to say MG BREAST: refused before any model
    disguised = _facts(TEST_FILES / "MR_small.dcm", Modality="MG", BodyPartExamined="BREAST",
                       SOPClassUID="1.2.840.10008.5.1.4.1.1.1.2")
    assert router.route(disguised).reason.startswith("outside the model's scope: matrix 64x64")
    # A rule may pick the model, never the pixels it cannot read.
    forced = Router(RoutingSettings(rules=[RoutingRule(name="all", model="density")]), _scopes())
    refused = forced.route(_facts(mammogram, NumberOfFrames=3))
    assert not refused.analyse and "model's scope: multi-frame" in refused.reason
    us = dict(Modality="US", SOPClassUID="1.2.840.10008.5.1.4.1.1.3.1",
              PhotometricInterpretation="MONOCHROME2")
    assert router.route(_facts(mammogram, NumberOfFrames=30, BitsStored=16, **us)).tasks == \
        (DEFAULT_MODEL,)
    tiny_us = router.route(_facts(mammogram, Rows=32, Columns=48, **us))
    assert tiny_us.reason == ("outside the model's scope: matrix 32x48 (the model reads 64 to "
                              "4096 pixels a side)")
    # Values a header does not state, or cannot, are left to decoding.
    unstated = _facts(mammogram, Rows="x")
    assert unstated.rows == 0 and router.route(unstated).tasks == (DENSITY_MODEL,)


def test_a_card_states_a_consistent_geometry():
    from pydantic import ValidationError

    from radlens.models.scope import ImageGeometry

    with pytest.raises(ValidationError, match="min_size 300 is above max_size 200"):
        ImageGeometry(min_size=300, max_size=200)
    with pytest.raises(ValidationError):
        ImageGeometry(frames="some")
    assert ImageGeometry().frames == "any"  # a card without limits takes every matrix


def _reading(category: str, side: str | None, view: str = "CC", *, tissue: float = 0.8,
             probabilities: dict[str, float] | None = None) -> DensityPrediction:
    probabilities = probabilities or {c: (0.7 if c == category else 0.1) for c in "ABCD"}
    return DensityPrediction(model=MODEL, category=category, probabilities=probabilities,
                             laterality=side, view=view,
                             attention=AttentionShares(tissue=tissue, artifacts=0.9 - tissue,
                                                       outside=0.1),
                             attention_on_artifact=tissue < 0.6)


def test_each_breast_averages_its_views_and_the_study_takes_the_denser_breast():
    readings = [_reading("B", "L"), _reading("C", "L", "MLO", probabilities={
        "A": 0.0, "B": 0.45, "C": 0.55, "D": 0.0}), _reading("C", "R"), _reading("D", "R", "MLO")]
    summary = BreastDensity.of(readings)
    assert summary is not None
    # left: B 0.575 against C 0.325 -> B; right: C and D tie at 0.4 -> the denser, D
    assert (summary.left, summary.right, summary.study) == ("B", "D", "D")
    assert summary.images == 4 and summary.attention_warnings == 0
    unlateralised = BreastDensity.of([_reading("A", None), _reading("A", None, "MLO")])
    assert unlateralised is not None and (unlateralised.left, unlateralised.study) == (None, "A")
    assert BreastDensity.of([]) is None


def _findings(readings: list[DensityPrediction]) -> StudyFindings:
    images = []
    for number, reading in enumerate(readings, start=1):
        ref = ImageRef(study_instance_uid="1.2.3", series_instance_uid="1.2.3.1",
                       sop_instance_uid=f"1.2.3.1.{number}",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.1.2")
        images.append(ImageInfo(ref=ref, modality="MG", photometric_interpretation="MONOCHROME2",
                                transfer_syntax_uid="1.2.840.10008.1.2.1", rows=64, columns=64,
                                frames=1, channels=1, spacing=None, analyses=[reading]))
    return StudyFindings(study_instance_uid="1.2.3", job_id=1, revision=1,
                         radlens_version="test", images=images,
                         summaries={DENSITY_MODEL: BreastDensity.of(readings)})


def test_the_template_states_each_breast_and_passes_grounding():
    findings = _findings([_reading("B", "L"), _reading("B", "L", "MLO"), _reading("C", "R"),
                          _reading("C", "R", "MLO", tissue=0.3)])
    narrative = template_narrative(findings)
    assert "right breast C (heterogeneously dense)" in narrative.text
    assert "left breast B (scattered areas of fibroglandular density)" in narrative.text
    assert "Study density category: C" in narrative.text
    assert "Attention-on-artifact warning on 1 mammogram(s)" in narrative.text
    assert grounding.check(narrative.text, StudyFacts.from_findings(findings)) == []


def test_grounding_rejects_a_category_or_a_side_the_findings_do_not_hold():
    facts = StudyFacts.from_findings(_findings([_reading("B", "L"), _reading("B", "L", "MLO")]))
    assert grounding.check("The left breast is category B.", facts) == []
    swapped = grounding.check("The left breast is heterogeneously dense.", facts)
    assert any("the left breast is B, not C" in v for v in swapped)
    invented = grounding.check("Study density category D.", facts)
    assert any("density category D is not in the findings" in v for v in invented)
    other_side = grounding.check("The right breast shows scattered fibroglandular tissue.",
                                 facts)
    assert any("'right': the findings give no side" in v for v in other_side)
    ultrasound = StudyFacts(modality="US", model="radlens-unet 1", images_analysed=1,
                            images_not_analysed=0)
    assert any("hold no breast density" in v for v in grounding.check(
        "The breasts are extremely dense.", ultrasound))
    assert any("'left'" in v for v in grounding.check("A lesion in the left breast.",
                                                       ultrasound))
