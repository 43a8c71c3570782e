"""The dermoscopy narrative's grounding: a descriptor the findings do not hold, one a level
contradicts ("symmetric" beside asymmetry level 4), a level they do not give, or a melanoma
the model did not suggest is refused; what the findings hold passes, negations included."""

from __future__ import annotations

import pytest

from radlens.tasks.dermoscopy.report import grounding_numbers, violations

STATED = {"photographs": [{
    "number": 1, "site": "back", "side": None, "melanoma_probability_percent": 12,
    "assessment": "nevus", "asymmetry": 0.19, "border_turns": 1.02, "border_per_mm": 0.512,
    "colour_score": 0.15, "diameter_mm": 6.3,
    "levels": {"asymmetry": 5, "border": 1, "colour": 1, "diameter_mm": 3},
    "descriptors": ["asymmetric shape", "regular border", "one or two colours"],
    "attention_on_lesion_percent": 81}]}


@pytest.mark.parametrize("text", [
    "Quantitative analysis: asymmetry 0.19 (level 5); border 1.02 (level 1). Visual features: "
    "asymmetric shape, regular border, one or two colours. Risk assessment: nevus, melanoma "
    "probability 12%.",
    "No features suggestive of melanoma; the border is regular.",
    "There are no streaks and no blue-gray areas.",
])
def test_what_the_findings_hold_passes(text):
    assert violations(text, STATED) == []


@pytest.mark.parametrize(("text", "expected"), [
    ("The lesion is symmetric.", "contradicts the measured asymmetry"),
    ("Visual features: blue-gray areas.", "'blue-gray areas' is not in the findings"),
    ("Streaks at the periphery.", "'streaks' is not in the findings"),
    ("Asymmetry level 3.", "asymmetry level 3 is not in the findings"),
    ("These features are consistent with melanoma.", "the model's assessment is nevus"),
])
def test_what_the_findings_do_not_hold_is_refused(text, expected):
    assert any(expected in found for found in violations(text, STATED)), violations(text,
                                                                                    STATED)


def test_without_dermoscopy_findings_a_level_is_refused():
    assert violations("Border level 2.", None)


def test_the_numbers_a_narrative_may_write():
    allowed = grounding_numbers(STATED)
    assert {0.19, 1.02, 6.3, 12.0, 0.12, 5.0, 81.0, 0.63} <= allowed
    assert 0.2 in allowed  # 0.19 to one decimal


def test_the_asymmetry_measurement_is_not_the_asymmetric_descriptor():
    """'asymmetry 0.12 to 0.31' states A; only 'asymmetric' or a bare 'asymmetry' names the
    descriptor, which a photograph without it may not be given."""
    without = {"photographs": [{**STATED["photographs"][0], "descriptors": []}]}
    assert violations("Quantitative analysis: asymmetry 0.19 (level 5).", without) == []
    assert violations("Asymmetry (level 5) is marked.", without) == []
    assert violations("The lesion shows asymmetry.", without)
    assert violations("An asymmetric lesion.", without)
