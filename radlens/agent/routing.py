"""Which tasks, if any, may read an image: their models' scopes and the site's routing rules.

A model card states the model's scope: modalities, body parts (BodyPartExamined values and
SNOMED CT anatomic region codes), SOP classes and photometric interpretations, and its intended
use. An image outside that scope is not analysed, with the reason. Many ultrasound headers state
no body part at all; routing rules from the configuration decide then (by calling AE title,
modality, body part, anatomic region code, or a Study/Series Description pattern), the first rule
that matches wins, and ``routing.unstated_body_part`` is the documented default when none does.
A rule can send an image to the model or to none; it never widens the technical scope (modality,
SOP class, photometric interpretation and the image geometry: single images or multi-frame, the
matrix size, the bits stored), since the model cannot read what it was not built for.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydicom.dataset import Dataset

from radlens.config import RoutingRule, RoutingSettings
from radlens.models.scope import ModelScope

NO_TASK = "none"


@dataclass(frozen=True)
class ImageFacts:
    """The header values routing looks at, read once from an image's header."""

    modality: str
    body_part: str
    anatomic_region_codes: tuple[str, ...]
    sop_class_uid: str
    photometric: str
    descriptions: str
    frames: int = 1
    rows: int = 0  # 0: not stated (or not a number)
    columns: int = 0
    bits_stored: int = 0
    image_type: tuple[str, ...] = ()
    contrast_agent: str = ""
    scanning_sequence: tuple[str, ...] = ()
    echo_time_ms: float | None = None
    series_description: str = ""

    @classmethod
    def from_dataset(cls, ds: Dataset) -> ImageFacts:
        codes = []
        for item in ds.get("AnatomicRegionSequence", []) or []:
            value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "")).strip()
            if value:
                codes.append(value)
        descriptions = " | ".join(text for text in (_text(ds, "StudyDescription"),
                                                     _text(ds, "SeriesDescription")) if text)
        return cls(modality=_text(ds, "Modality").upper(),
                   body_part=_text(ds, "BodyPartExamined").upper(),
                   anatomic_region_codes=tuple(codes),
                   sop_class_uid=_text(ds, "SOPClassUID"),
                   photometric=_text(ds, "PhotometricInterpretation").upper(),
                   descriptions=descriptions,
                   frames=max(1, _number(ds, "NumberOfFrames")),
                   rows=_number(ds, "Rows"), columns=_number(ds, "Columns"),
                   bits_stored=_number(ds, "BitsStored"),
                   image_type=_values(ds, "ImageType"),
                   contrast_agent=_text(ds, "ContrastBolusAgent"),
                   scanning_sequence=_values(ds, "ScanningSequence"),
                   echo_time_ms=_decimal(ds, "EchoTime"),
                   series_description=_text(ds, "SeriesDescription"))

    @property
    def states_anatomy(self) -> bool:
        return bool(self.body_part or self.anatomic_region_codes)


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """A multi-valued code string's values, upper case ("" values dropped)."""
    try:
        value = ds.get(keyword)
        items = [value] if isinstance(value, str) else list(value or [])
        return tuple(str(v).strip().upper() for v in items if str(v).strip())
    except Exception:  # a value pydicom cannot convert
        return ()


def _decimal(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value in (None, "") else float(value)
    except Exception:
        return None


def _text(ds: Dataset, keyword: str) -> str:
    try:
        return str(ds.get(keyword, "") or "").strip()
    except Exception:  # a value pydicom cannot convert says nothing usable
        return ""


def _number(ds: Dataset, keyword: str) -> int:
    """A non-negative integer the header states, or 0 when it states none usable."""
    try:
        value = int(ds.get(keyword, 0) or 0)
    except Exception:  # an IS that is not a number, a value pydicom cannot convert
        return 0
    return max(0, value)


@dataclass(frozen=True)
class RouteDecision:
    """``tasks``: the tasks that read the image, in the registry's order (empty: none, and
    ``reason`` says why)."""

    tasks: tuple[str, ...]
    reason: str

    @property
    def analyse(self) -> bool:
        return bool(self.tasks)


class Router:
    """Routes each image to the loaded tasks that may read it, or to none, with the reason.

    A task may read an image only within its technical scope (modality, SOP class,
    photometric interpretation, image geometry). Among the tasks that may, the first matching
    rule decides (a rule names tasks, or ``none``; one naming no task admits the image to the
    tasks whose anatomy it states, or to all of them when it states none); without one, every
    task whose anatomy the header states; a header stating no
    anatomy goes to every task in scope when ``unstated_body_part`` is ``analyse``. Several
    tasks may read one image: each adds its reading to the study's one report."""

    def __init__(self, settings: RoutingSettings,
                 scopes: Mapping[str, ModelScope | None]) -> None:
        self.settings = settings
        self.scopes: dict[str, ModelScope | None] = dict(scopes)

    def route(self, facts: ImageFacts, calling_ae: str | None = None) -> RouteDecision:
        """The first matching rule decides about anatomy; the tasks' scopes decide the rest."""
        refusals = {name: _outside_technical_scope(scope, facts)
                    for name, scope in self.scopes.items()}
        candidates = [name for name, refusal in refusals.items() if refusal is None]
        if not candidates:
            refusal = self._refusal(refusals, facts) if refusals else "no task is loaded"
            return RouteDecision((), f"outside the model's scope: {refusal}")
        for number, rule in enumerate(self.settings.rules, start=1):
            if rule_matches(rule, facts, calling_ae):
                name = rule.name or f"rule {number}"
                if rule.tasks is None:  # the rule admits the image; the scopes choose
                    if facts.states_anatomy:
                        chosen = self._by_anatomy(candidates, facts)
                        if not chosen.analyse:
                            return chosen
                        candidates = list(chosen.tasks)
                    return RouteDecision(tuple(candidates), f"routing rule {name!r} matched")
                return self._by_rule(name, rule.tasks, candidates, refusals)
        if facts.states_anatomy:
            return self._by_anatomy(candidates, facts)
        if self.settings.unstated_body_part == "analyse":
            return RouteDecision(tuple(candidates), "no body part stated and no routing rule "
                                 "matched: routing.unstated_body_part is 'analyse' (the "
                                 "out-of-distribution check still applies)")
        return RouteDecision((), "no body part stated and no routing rule matched "
                             "(routing.unstated_body_part is 'skip')")

    def _by_anatomy(self, candidates: list[str], facts: ImageFacts) -> RouteDecision:
        """Every task whose anatomy the header states, or why none."""
        decisions = [_by_anatomy(name, self.scopes[name], facts) for name in candidates]
        chosen = tuple(name for d in decisions for name in d.tasks)
        if not chosen:
            return decisions[0]
        return RouteDecision(chosen, "; ".join(dict.fromkeys(
            d.reason for d in decisions if d.analyse)))

    def _by_rule(self, name: str, tasks: tuple[str, ...], candidates: list[str],
                 refusals: dict[str, str | None]) -> RouteDecision:
        if not tasks:
            return RouteDecision((), f"routing rule {name!r} sends it to no model")
        chosen, reasons = [], []
        for task in tasks:
            if task not in self.scopes:
                reasons.append(f"routing rule {name!r} sends it to the {task} model, which is "
                               "not loaded")
            elif task not in candidates:
                reasons.append(f"routing rule {name!r} sends it to the {task} model, but it "
                               f"is outside that model's scope: {refusals[task]}")
            else:
                chosen.append(task)
        if not chosen:
            return RouteDecision((), "; ".join(reasons))
        ordered = tuple(task for task in self.scopes if task in chosen)
        return RouteDecision(ordered, f"routing rule {name!r} matched")

    def _refusal(self, refusals: dict[str, str | None], facts: ImageFacts) -> str:
        """Why no task may read it: that of the task built for this modality, if one is."""
        for name, scope in self.scopes.items():
            if scope is not None and facts.modality in scope.modalities:
                return str(refusals[name])
        return str(next(iter(refusals.values())))


def _outside_technical_scope(scope: ModelScope | None, facts: ImageFacts) -> str | None:
    if scope is None:
        return None
    if facts.modality not in scope.modalities:
        return f"modality {facts.modality or 'unknown'}"
    if facts.sop_class_uid not in scope.sop_classes:
        from pydicom.uid import UID

        uid = UID(facts.sop_class_uid)
        retired = " (retired)" if uid.is_valid and uid.is_retired else ""
        return f"SOP class {uid.name or facts.sop_class_uid}{retired}"
    if facts.photometric not in scope.photometric_interpretations:
        return f"photometric interpretation {facts.photometric or 'unknown'}"
    if scope.geometry is not None:
        refusal = scope.geometry.refusal(frames=facts.frames, rows=facts.rows,
                                         columns=facts.columns, bits_stored=facts.bits_stored)
        if refusal is not None:
            return refusal
    if scope.series is not None:
        return scope.series.refusal(image_type=facts.image_type,
                                    contrast_agent=facts.contrast_agent,
                                    scanning_sequence=facts.scanning_sequence,
                                    echo_time_ms=facts.echo_time_ms,
                                    series_description=facts.series_description)
    return None


def _by_anatomy(name: str, scope: ModelScope | None, facts: ImageFacts) -> RouteDecision:
    if scope is None:
        return RouteDecision((name,), "the model states no scope")
    codes = {region.value for region in scope.anatomic_regions}
    if facts.body_part and facts.body_part in scope.body_parts:
        return RouteDecision((name,), f"body part {facts.body_part} is in scope")
    if set(facts.anatomic_region_codes) & codes:
        return RouteDecision((name,), "anatomic region code is in scope")
    stated = (f"body part {facts.body_part}" if facts.body_part else
              f"anatomic region {', '.join(facts.anatomic_region_codes)}")
    return RouteDecision((), f"outside the model's scope: {stated}")


def rule_matches(rule: RoutingRule, facts: ImageFacts, calling_ae: str | None) -> bool:
    """Every criterion the rule gives must hold; a rule with none matches everything."""
    if rule.calling_ae is not None and (calling_ae or "").strip() != rule.calling_ae:
        return False
    if rule.modality is not None and facts.modality != rule.modality.upper():
        return False
    if rule.body_part is not None and facts.body_part != rule.body_part.upper():
        return False
    if rule.anatomic_region is not None and rule.anatomic_region not in \
            facts.anatomic_region_codes:
        return False
    return rule.description is None or re.search(rule.description, facts.descriptions,
                                                 re.IGNORECASE) is not None
