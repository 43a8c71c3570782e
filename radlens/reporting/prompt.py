"""The LLM prompt, built from a study's findings alone (docs/method.md: the narrative).

Free of identifiers by construction: ``StudyFacts`` is made from ``StudyFindings``, which holds no
names, IDs, dates or header free text, and images are numbered here instead of being named by
their UIDs. The facts go to the model as structured JSON, never as prose: what the study is,
and each task's facts under its name (``radlens.tasks``), with the report's sections asked for
and each task's guidance on what its findings need said.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from radlens.findings import StudyFindings

SYSTEM = (
    "You are a careful radiology reporting assistant for medical imaging research. You write "
    "only what the structured findings you are given support: every number you write must be "
    "one of theirs, rounded as given, and you never add a lesion, a side, a location, a size or "
    "a finding they do not hold. Nothing you write is a diagnosis: a category is an AI "
    "suggestion for a qualified reader. Answer with JSON matching the schema you are given."
)

SECTIONS = (
    "From the findings JSON below, write: (1) impression: a short, readable clinical summary of "
    "the study; (2) lesions: one description per finding the findings list, in order (none if "
    "they list none); (3) comparison: how those findings compare (or 'single lesion' / 'no "
    "lesion'); (4) recommendation: the category of each, worded as an AI suggestion; (5) "
    "limitations: what this automated analysis cannot tell (2-D images, no clinical context, "
    "saliency shows where the model looked, not whether it is correct)."
)


class StudyFacts(BaseModel):
    """Everything the LLM may know about a study, and all the grounding checks against:
    ``tasks`` holds each task's facts (as JSON) under the task's name."""

    modality: str
    model: str
    images_analysed: int
    images_not_analysed: int
    tasks: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @classmethod
    def from_findings(cls, findings: StudyFindings) -> StudyFacts:
        from radlens.tasks.registry import all_tasks

        tasks = {}
        for task in all_tasks():
            if task.analysed(findings):
                stated = task.facts(findings)
                if stated is not None:
                    tasks[task.name] = stated.model_dump(mode="json")
        analysed = [image for image in findings.images if image.analyses]
        modality = next((image.modality for image in analysed if image.modality), "") or "US"
        model = f"{findings.model.name} {findings.model.version}" if findings.model else "none"
        return cls(modality=modality, model=model, images_analysed=len(analysed),
                   images_not_analysed=sum(1 for i in findings.images if i.not_analysed),
                   tasks=tasks)

    def of(self, task: str, facts_type: type[Any]) -> Any:
        """One task's facts, typed again (None when the study holds none of its findings)."""
        stated = self.tasks.get(task)
        return None if stated is None else facts_type.model_validate(stated)


def instructions(facts: StudyFacts) -> str:
    """The sections, then the guidance of each task whose facts the study holds."""
    from radlens.tasks.registry import all_tasks

    guidance = [task.prompt_guidance for task in all_tasks()
                if task.name in facts.tasks and task.prompt_guidance]
    return " ".join([SECTIONS, *guidance])


def chat_messages(facts: StudyFacts, *, violations: list[str] | None = None
                  ) -> list[dict[str, str]]:
    """System and user messages; on a retry, the grounding violations to correct."""
    user = (f"{instructions(facts)}\n\nFindings JSON:\n"
            f"{json.dumps(facts.model_dump(), indent=1)}")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    if violations:
        messages.append({"role": "user", "content": (
            "Your previous answer was rejected because it is not supported by the findings:\n- "
            + "\n- ".join(violations) + "\nWrite it again using only the findings.")})
    return messages
