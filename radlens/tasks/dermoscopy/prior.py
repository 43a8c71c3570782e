"""The change since the patient's prior visit of the same lesion.

Each reading whose lesion the site's matching rule names (``lesion_key``) is remembered with
its ABC(D) values, levels, melanoma probability and the model that read it; a later study of
the same patient with the same lesion gets the change in each value both visits measured,
with both dates. The values compared are the scale-free ones always (A, the border's total
turning, the colour score, the probability) and those in mm where both photographs stated
their spacing. A probability read by another model is compared all the same but the reading
names the prior model, and the narrative says so: a change of model is not a change of lesion.
"""

from __future__ import annotations

from typing import Any

from radlens.findings import StudyFindings
from radlens.history import ObservedItem, PatientHistory, days_between
from radlens.tasks.dermoscopy.findings import (
    TASK_NAME,
    Change,
    DermoscopyReading,
    PriorVisit,
)

# What is compared, with the decimals each is stated at.
COMPARED: dict[str, int] = {"asymmetry": 4, "border_turns": 3, "border_per_mm": 4,
                            "colour_score": 4, "diameter_mm": 2, "area_mm2": 2,
                            "melanoma_probability": 4}


def remembered(reading: DermoscopyReading) -> dict[str, Any]:
    """What a later visit needs of this reading."""
    values: dict[str, Any] = {"melanoma_probability": reading.melanoma_probability,
                              "assessment": reading.assessment,
                              "model": f"{reading.model.name} {reading.model.version}"}
    m = reading.measurements
    if m is not None:
        values.update(asymmetry=m.asymmetry, border_turns=m.border_turns,
                      border_per_mm=m.border_per_mm, colour_score=m.colour_score,
                      diameter_mm=m.diameter_mm, area_mm2=m.area_mm2, levels=dict(m.levels))
    return values


def observations(findings: StudyFindings) -> list[ObservedItem]:
    """One per lesion the study names: its first photograph's reading (a second photograph
    of the same lesion in one study is not a second lesion)."""
    seen: dict[str, ObservedItem] = {}
    for info in findings.images:
        for reading in info.analyses_of(TASK_NAME):
            if isinstance(reading, DermoscopyReading) and reading.lesion_key is not None:
                seen.setdefault(reading.lesion_key,
                                ObservedItem(reading.lesion_key, remembered(reading)))
    return list(seen.values())


def change(reading: DermoscopyReading, prior: dict[str, Any], *, study_date: str,
           prior_study_date: str, prior_study_instance_uid: str) -> PriorVisit:
    """The reading against the prior visit's remembered values."""
    now = remembered(reading)
    changes = {}
    for name, decimals in COMPARED.items():
        before, after = prior.get(name), now.get(name)
        if isinstance(before, int | float) and isinstance(after, int | float):
            changes[name] = Change(prior=round(float(before), decimals),
                                   now=round(float(after), decimals),
                                   change=round(float(after) - float(before), decimals))
    levels = prior.get("levels") or {}
    return PriorVisit(
        study_date=study_date, prior_study_date=prior_study_date,
        prior_study_instance_uid=prior_study_instance_uid,
        interval_days=days_between(prior_study_date, study_date), changes=changes,
        prior_levels={str(k): (int(v) if v is not None else None) for k, v in levels.items()},
        prior_assessment="melanoma" if prior.get("assessment") == "melanoma" else "nevus",
        prior_model=str(prior.get("model") or "unknown"))


def compare_with_prior(findings: StudyFindings, history: PatientHistory) -> StudyFindings:
    """Each reading with the change since its lesion's prior visit, where the state holds
    one (a study with no date, or a lesion seen for the first time, is left as it is)."""
    if history.study_date is None:
        return findings
    images, changed = [], False
    for info in findings.images:
        analyses = []
        for reading in info.analyses:
            if isinstance(reading, DermoscopyReading) and reading.lesion_key is not None:
                found = history.prior(TASK_NAME, reading.lesion_key)
                if found is not None and found.study_date is not None:
                    reading = reading.model_copy(update={"prior": change(
                        reading, found.values, study_date=history.study_date,
                        prior_study_date=found.study_date,
                        prior_study_instance_uid=found.study_instance_uid)})
                    changed = True
            analyses.append(reading)
        images.append(info.model_copy(update={"analyses": analyses}) if changed else info)
    return findings.model_copy(update={"images": images}) if changed else findings
