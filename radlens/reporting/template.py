"""The deterministic narrative: the embedded default, and the fallback whenever the LLM is off,
slow, wrong or absent. Built from the findings alone, in a plain clinical style: each task that
read the study gives its lines (``radlens.tasks``), then what was not analysed, then the
limitations of what ran."""

from __future__ import annotations

from radlens.findings import StudyFindings
from radlens.reporting.narrative import TEMPLATE_AUTHOR, Narrative


def template_narrative(findings: StudyFindings) -> Narrative:
    from radlens.tasks.registry import all_tasks

    parts = [part for task in all_tasks() if task.analysed(findings)
             if (part := task.narrative(findings)) is not None]
    if not parts:
        model = (f"{findings.model.name} {findings.model.version}" if findings.model
                 else "no model")
        return _nothing_analysed(findings, model)
    lines = [line for part in parts for line in part.lines]
    lines += _not_analysed_lines(findings)
    lines += list(dict.fromkeys(part.limitations for part in parts))
    return Narrative(text="\n".join(lines), author=TEMPLATE_AUTHOR)


def _not_analysed_lines(findings: StudyFindings) -> list[str]:
    lines = []
    not_analysed = [image for image in findings.images if image.not_analysed]
    if not_analysed:
        lines.append(f"{len(not_analysed)} image(s) were not analysed (see the report notes).")
    abstained = sum(len(image.abstained) for image in findings.images if image.predictions)
    if abstained:
        lines.append(f"{abstained} frame(s) were not analysed because they are unlike the "
                     "images the model was trained on; no finding is stated for them.")
    return lines


def _nothing_analysed(findings: StudyFindings, model: str) -> Narrative:
    """No frame was analysed: say so, and state no finding either way."""
    received = len(findings.images) + len(findings.skipped)
    lines = [f"No image of this study was analysed by {model}: {received} object(s) received, "
             "none within the model's scope or like its training images (the reasons are in "
             "the report notes). radlens makes no statement about this study.",
             "Not for diagnostic use."]
    return Narrative(text="\n".join(lines), author=TEMPLATE_AUTHOR)
