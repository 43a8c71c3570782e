"""Checks that a narrative says nothing the findings do not hold.

Every number must be one of the facts' numbers (within the rounding it was given at, in the
unit it was given in, or converted between mm and cm, or a percentage of a probability); the
lesions it names must exist and carry the class it gives them; no side, quadrant or clock
position may appear (2-D images without geometry know none), and no identifier-like string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from radlens.reporting.prompt import StudyFacts

_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)")
_LESION = re.compile(r"\blesion\s+(\d+)\b", re.IGNORECASE)
_SIDES = re.compile(r"\b(left|right|bilateral|(upper|lower)[- ](inner|outer)|quadrants?|axilla"
                    r"|axillary|retroareolar|subareolar|periareolar|nipple)\b", re.IGNORECASE)
_CLOCK = re.compile(r"\b\d{1,2}\s*(?::00)?\s*o[' ]?clock\b", re.IGNORECASE)
_IDENTIFIER = re.compile(r"\b\d+(?:\.\d+){4,}\b|\b(19|20)\d{2}-\d{2}-\d{2}\b|\bMRN\b|\bDOB\b",
                         re.IGNORECASE)
_WORD_NUMBERS = {"no": 0, "one": 1, "a single": 1, "single": 1, "two": 2, "three": 3,
                 "four": 4, "five": 5, "six": 6}
_COUNT = re.compile(r"\b(\d+|no|one|a single|single|two|three|four|five|six)\s+(?:focal\s+|"
                    r"distinct\s+|separate\s+)?lesions?\b", re.IGNORECASE)
# Findings the model does not make: naming one invents it.
_UNSUPPORTED = re.compile(r"\b(calcifications?|microcalcifications?|cysts?|cystic|lymph nodes?|"
                          r"metasta\w*|architectural distortion|haematoma|hematoma|abscess|"
                          r"implants?|ductal|invasive|carcinoma|fibroadenoma)\b", re.IGNORECASE)
# Small integers a report needs whatever the findings: task and list numbering, BI-RADS
# category digits, the five-level scale, "2-D".
_ALWAYS = {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}


def allowed_numbers(facts: StudyFacts) -> set[float]:
    """Every number the narrative may write, in every unit and rounding it may use."""
    values: set[float] = set(_ALWAYS)

    def add(value: float | None, *, decimals: Iterable[int] = (0, 1, 2)) -> None:
        if value is None:
            return
        for d in decimals:
            values.add(round(float(value), d))

    for image in facts.images:
        add(image.number)
        add(image.frame)
        for percent in image.probability_percent.values():
            add(percent)
            add(percent / 100)
        for agreement in image.saliency_agreement.values():
            for value in agreement.values():
                add(value)
                add(value * 100, decimals=(0,))
    for lesion in facts.lesions:
        for value in (lesion.number, lesion.image, lesion.frame, lesion.probability_percent,
                      lesion.malignant_probability_percent, lesion.compactness,
                      lesion.edge_sharpness, lesion.asymmetry, lesion.border_irregularity,
                      lesion.longest_diameter_px, lesion.suggested_category):
            add(value)
        for percent in (lesion.probability_percent, lesion.malignant_probability_percent):
            if percent is not None:
                add(percent / 100)
        for mm in (lesion.longest_diameter_mm, lesion.perpendicular_diameter_mm):
            add(mm)
            add(None if mm is None else mm / 10)  # cm
        add(lesion.area_mm2)
        add(None if lesion.area_mm2 is None else lesion.area_mm2 / 100)  # cm²
        for level in lesion.levels.values():
            add(level)
    if facts.density is not None:
        values.add(float(len(facts.density.mammograms)))
        values.add(float(facts.density.attention_warnings))
        for mammogram in facts.density.mammograms:
            add(mammogram.number)
            add(mammogram.attention_on_tissue_percent)
            add(mammogram.attention_on_tissue_percent / 100)
            for percent in mammogram.probability_percent.values():
                add(percent)
                add(percent / 100)
    values.add(float(facts.images_analysed))
    values.add(float(len(facts.lesions)))
    values.add(float(facts.images_not_analysed))
    return values


def number_violations(text: str, allowed: set[float]) -> list[str]:
    """Numbers the text writes that none of ``allowed`` rounds to."""
    violations = []
    for match in _NUMBER.finditer(text):
        value = float(match.group(1))
        decimals = len(match.group(1).split(".")[1]) if "." in match.group(1) else 0
        tolerance = 0.5 * 10 ** -decimals + 1e-9
        if not any(abs(value - a) <= tolerance for a in allowed):
            violations.append(f"the number {match.group(1)} is not in the findings")
    return violations


def location_and_identifier_violations(text: str, sides: frozenset[str] = frozenset()
                                       ) -> list[str]:
    """Sides, locations and identifiers the text may not name; ``sides`` ("left", "right")
    are those the findings do name (a mammogram's laterality)."""
    violations = [f"'{match.group(0)}': the findings give no side or location"
                  for match in _SIDES.finditer(text) if match.group(0).lower() not in sides]
    if _CLOCK.search(text):
        violations.append("a clock-face position: the findings give none")
    if _IDENTIFIER.search(text):
        violations.append("an identifier or date: the narrative must hold none")
    return violations


def check(text: str, facts: StudyFacts) -> list[str]:
    """The narrative's violations, each a sentence a model (or a person) can act on."""
    text = text.replace(facts.model, "the model")  # its name and version are facts too
    violations = number_violations(text, allowed_numbers(facts))
    numbers = {lesion.number: lesion for lesion in facts.lesions}
    for match in _LESION.finditer(text):
        number = int(match.group(1))
        if number not in numbers:
            violations.append(f"lesion {number} does not exist (the findings hold "
                              f"{len(numbers)} lesion(s))")
    for number, lesion in numbers.items():
        for sentence in _sentences_naming(text, number):
            other = "malignant" if lesion.lesion_class == "benign" else "benign"
            if re.search(rf"\b{other}(-appearing| lesion)?\b", sentence, re.IGNORECASE) and \
                    not re.search(rf"\b{lesion.lesion_class}\b", sentence, re.IGNORECASE):
                violations.append(f"lesion {number} is {lesion.lesion_class}, not {other}")
    if not facts.lesions and re.search(r"\b(a|one|two|\d+) (focal )?(lesion|mass)(es|s)? "
                                       r"(is|are|was|were) (seen|detected|found|present)",
                                       text, re.IGNORECASE):
        violations.append("the findings hold no lesion")
    for match in _COUNT.finditer(text):
        said = match.group(1).lower()
        count = int(said) if said.isdigit() else _WORD_NUMBERS[said]
        if count != len(facts.lesions):
            violations.append(f"'{match.group(0)}': the findings hold {len(facts.lesions)} "
                              "lesion(s)")
    violations += [f"'{m.group(0)}': the findings hold no such finding"
                   for m in _UNSUPPORTED.finditer(text)]
    violations += density_violations(text, facts)
    sides = frozenset({"left", "right"} & {m.side for m in facts.density.mammograms
                                             if m.side}) if facts.density else frozenset()
    violations += location_and_identifier_violations(text, sides)
    return list(dict.fromkeys(violations))


# A density category, by letter ("category C", "density C", "composition (C)") or in words.
_DENSITY_LETTER = re.compile(r"\b(?i:category|composition|density|BI-RADS)\s*[:(]?\s*([A-D])\b")
_DENSITY_WORDS = {"almost entirely fat": "A", "scattered fibroglandular": "B",
                  "scattered areas": "B", "heterogeneously dense": "C",
                  "extremely dense": "D"}


def _categories(sentence: str) -> set[str]:
    named = {m.group(1) for m in _DENSITY_LETTER.finditer(sentence)}
    lower = sentence.lower()
    return named | {c for words, c in _DENSITY_WORDS.items() if words in lower}


def density_violations(text: str, facts: StudyFacts) -> list[str]:
    """A density category the findings do not hold, or one given to the wrong breast."""
    density = facts.density
    violations = []
    for sentence in _sentences(text):
        named = _categories(sentence)
        if not named:
            continue
        if density is None:
            violations.append(f"'{sentence.strip()[:80]}': the findings hold no breast density")
            continue
        held = {density.study} | {m.category for m in density.mammograms}
        for category in sorted(named - held):
            violations.append(f"density category {category} is not in the findings (they "
                              f"hold {', '.join(sorted(held))})")
        lower = sentence.lower()
        for side in ("left", "right"):
            other = "right" if side == "left" else "left"
            if re.search(rf"\b{side}\b", lower) and not re.search(rf"\b{other}\b", lower):
                breast = getattr(density, side)
                allowed = {breast} | {m.category for m in density.mammograms if m.side == side}
                for category in sorted(named - allowed - {None}):
                    violations.append(f"the {side} breast is "
                                      f"{breast if breast else 'not in the findings'}, not "
                                      f"{category}")
    return violations


def _sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.;\n])\s+", text)


def _sentences_naming(text: str, number: int) -> list[str]:
    return [s for s in _sentences(text) if re.search(rf"\blesion\s+{number}\b", s, re.IGNORECASE)]
