"""Checks that a narrative says nothing the findings do not hold.

Every number must be one of the facts' numbers (within the rounding it was given at, in the
unit it was given in, or converted between mm and cm, or a percentage of a probability); each
task checks what its own findings are (``radlens.tasks``: the lesions a text names and their
class, a category and the side it is given); no side, quadrant or clock position may appear
unless a task's facts state it (2-D images without geometry know none), and no
identifier-like string and no date but those a task's facts state (a study compared with a
prior visit gives both dates).
"""

from __future__ import annotations

import re

from radlens.reporting.prompt import StudyFacts

_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)")
_SIDES = re.compile(r"\b(left|right|bilateral|(upper|lower)[- ](inner|outer)|quadrants?|axilla"
                    r"|axillary|retroareolar|subareolar|periareolar|nipple)\b", re.IGNORECASE)
_CLOCK = re.compile(r"\b\d{1,2}\s*(?::00)?\s*o[' ]?clock\b", re.IGNORECASE)
_IDENTIFIER = re.compile(r"\b\d+(?:\.\d+){4,}\b|\b(19|20)\d{2}-\d{2}-\d{2}\b|\bMRN\b|\bDOB\b",
                         re.IGNORECASE)
# Findings the model does not make: naming one invents it.
_UNSUPPORTED = re.compile(r"\b(calcifications?|microcalcifications?|cysts?|cystic|lymph nodes?|"
                          r"metasta\w*|architectural distortion|haematoma|hematoma|abscess|"
                          r"implants?|ductal|invasive|carcinoma|fibroadenoma)\b", re.IGNORECASE)
# Small integers a report needs whatever the findings: task and list numbering, BI-RADS
# category digits, the five-level scale, "2-D".
_ALWAYS = {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}


def allowed_numbers(facts: StudyFacts) -> set[float]:
    """Every number the narrative may write, in every unit and rounding it may use."""
    from radlens.tasks.registry import all_tasks

    values: set[float] = set(_ALWAYS)
    for task in all_tasks():
        if task.name in facts.tasks:
            values |= task.grounding_numbers(facts.tasks[task.name])
    values.add(float(facts.images_analysed))
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
    are those the findings do name (an image's stated laterality)."""
    violations = [f"'{match.group(0)}': the findings give no side or location"
                  for match in _SIDES.finditer(text) if match.group(0).lower() not in sides]
    if _CLOCK.search(text):
        violations.append("a clock-face position: the findings give none")
    if _IDENTIFIER.search(text):
        violations.append("an identifier or date: the narrative must hold none")
    return violations


def check(text: str, facts: StudyFacts) -> list[str]:
    """The narrative's violations, each a sentence a model (or a person) can act on."""
    from radlens.tasks.registry import all_tasks

    text = text.replace(facts.model, "the model")  # its name and version are facts too
    for date in _stated_dates(facts):  # a study's and its prior visit's, where compared
        text = text.replace(date, "that date")
    violations = number_violations(text, allowed_numbers(facts))
    sides: frozenset[str] = frozenset()
    for task in all_tasks():
        stated = facts.tasks.get(task.name)
        violations += task.grounding_violations(text, stated)
        if stated is not None:
            sides |= task.named_sides(stated)
    violations += [f"'{m.group(0)}': the findings hold no such finding"
                   for m in _UNSUPPORTED.finditer(text)]
    violations += location_and_identifier_violations(text, sides)
    return list(dict.fromkeys(violations))


def _stated_dates(facts: StudyFacts) -> frozenset[str]:
    from radlens.tasks.registry import all_tasks

    dates: frozenset[str] = frozenset()
    for task in all_tasks():
        stated = facts.tasks.get(task.name)
        if stated is not None:
            dates |= task.stated_dates(stated)
    return dates


def sentences(text: str) -> list[str]:
    return re.split(r"(?<=[.;\n])\s+", text)
