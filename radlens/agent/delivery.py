"""Where a study's outputs go: the destinations a delivery rule chooses on the study's source
(calling AE title, modality, study description), "sender" meaning the calling AE's own return
address, and per destination which kinds of output it takes (``Destination.outputs``).

Nothing here sends: the supervisor asks ``plan`` while it queues a job's outputs in the job's
own transaction, and ``radlens route`` asks it to show an operator where a study would go.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    KeyObjectSelectionDocumentStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    ParametricMapStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from radlens.config import Destination, Settings
from radlens.config.settings import sender_destination
from radlens.dicom_io.scu import OutgoingFile

#: The kind of output each SOP class radlens writes is.
OUTPUT_KIND_OF_CLASS = {
    str(SegmentationStorage): "seg",
    str(Comprehensive3DSRStorage): "sr",
    str(ComprehensiveSRStorage): "sr",
    str(EnhancedSRStorage): "sr",
    str(ParametricMapStorage): "parametric_map",
    str(SecondaryCaptureImageStorage): "overlay",
    str(MultiFrameTrueColorSecondaryCaptureImageStorage): "overlay",
    str(EncapsulatedPDFStorage): "pdf",
    str(KeyObjectSelectionDocumentStorage): "rejection",
}


@dataclass(frozen=True)
class StudySource:
    """What the rules look at: where the study came from and what it holds."""

    calling_aets: frozenset[str]
    modalities: frozenset[str]
    study_description: str = ""
    tasks: frozenset[str] = frozenset()  # the tasks that read an image; empty: none

    @staticmethod
    def tasks_of(findings: dict) -> frozenset[str]:
        """From a study's findings.json, as stored (any schema): which tasks read its images."""
        from radlens.findings import SCHEMA_1_TASK_FIELDS

        ran: set[str] = set()
        for image in findings.get("images", []) or []:
            if not isinstance(image, dict):
                continue
            ran.update(str(analysis["task"]) for analysis in image.get("analyses", []) or []
                       if isinstance(analysis, dict) and analysis.get("task"))
            ran.update(task for key, task in SCHEMA_1_TASK_FIELDS.items() if image.get(key))
        return frozenset(ran)


@dataclass
class DeliveryPlan:
    """The destinations a study's outputs go to, each with the kinds it takes, and why."""

    destinations: list[Destination] = field(default_factory=list)
    reason: str = ""
    missing: list[str] = field(default_factory=list)  # "sender" with no return address

    def files_for(self, destination: Destination, results: Sequence[OutgoingFile],
                  sources: Sequence[OutgoingFile]) -> list[OutgoingFile]:
        """Of a job's results and its study's received instances, what ``destination`` gets
        (the rejection note after everything else)."""
        taken = set(destination.outputs)
        chosen = [f for f in results
                  if OUTPUT_KIND_OF_CLASS.get(f.sop_class_uid, "") in taken
                  and OUTPUT_KIND_OF_CLASS.get(f.sop_class_uid) != "rejection"]
        if "sources" in taken:
            chosen += list(sources)
        chosen += [f for f in results
                   if OUTPUT_KIND_OF_CLASS.get(f.sop_class_uid) == "rejection"
                   and "rejection" in taken]
        return chosen


def _matches(rule_value: str | None, values: Iterable[str]) -> bool:
    return rule_value is None or rule_value.strip().upper() in {v.strip().upper()
                                                                  for v in values}


def plan(settings: Settings, source: StudySource) -> DeliveryPlan:
    """The first rule whose every condition holds chooses; none: every destination (or none,
    ``delivery.unmatched``)."""
    by_name = {d.name: d for d in settings.delivery_destinations()}
    for rule in settings.delivery.rules:
        if not _matches(rule.calling_aet, source.calling_aets):
            continue
        if not _matches(rule.modality, source.modalities):
            continue
        if rule.study_description is not None and not re.search(
                rule.study_description, source.study_description, re.IGNORECASE):
            continue
        if rule.task is not None and not (rule.task in source.tasks or
                                          (rule.task == "none" and not source.tasks)):
            continue
        chosen: list[Destination] = []
        missing: list[str] = []
        for name in rule.destinations:
            if name != "sender":
                chosen.append(by_name[name])
                continue
            for aet in sorted(source.calling_aets):
                found = by_name.get(sender_destination(aet))
                if found is None:
                    missing.append(f"sender {aet} (no dicom.peers return address)")
                else:
                    chosen.append(found)
        unique = list({d.name: d for d in chosen}.values())
        return DeliveryPlan(unique, f"delivery rule {rule.name!r}", missing)
    if not settings.destinations:
        return DeliveryPlan([], "no destinations are configured")
    if settings.delivery.unmatched == "none":
        return DeliveryPlan([], "no delivery rule matched (delivery.unmatched: none)")
    return DeliveryPlan(list(settings.destinations),
                        "no delivery rule matched: every destination" if settings.delivery.rules
                        else "every destination (no delivery rules)")
