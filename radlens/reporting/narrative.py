"""The narrative and the BI-RADS-style suggestion, shared by the SR, the template and the LLM."""

from __future__ import annotations

from dataclasses import dataclass

from radlens.findings import LesionMeasurements

TEMPLATE_AUTHOR = "radlens template"


@dataclass(frozen=True)
class Narrative:
    """The report's text and who wrote it: the template, or the LLM model's name."""

    text: str
    author: str
    grounded: bool | None = None  # None: no grounding check applies (the template)
    note: str | None = None  # why the template stands in for the LLM, when it does

    @property
    def author_line(self) -> str:
        line = self.author
        if self.grounded is not None:
            line += f" (grounding {'passed' if self.grounded else 'failed'})"
        if self.note:
            line += f"; {self.note}"
        return line

    @classmethod
    def failure(cls, reason: str) -> Narrative:
        """The text of a report whose analysis failed: no finding is stated, either way."""
        return cls(text=("The automated analysis of this study failed, so radlens makes no "
                         f"statement about it. Reason: {reason}"[:2000]),
                   author=TEMPLATE_AUTHOR)


@dataclass(frozen=True)
class Category:
    """A BI-RADS-style category from the model's malignancy likelihood. A suggestion for a
    reader, never a BI-RADS assessment."""

    value: int
    meaning: str

    @classmethod
    def from_likelihood(cls, malignant: float) -> Category:
        """BI-RADS likelihood bands (3: <= 2 %, 4: 2-95 %, 5: >= 95 %); a model cannot call a
        finding certainly benign, so a detected lesion is never placed below 3."""
        if malignant >= 0.95:
            return cls(5, "highly suggestive of malignancy")
        if malignant > 0.02:
            return cls(4, "suspicious")
        return cls(3, "probably benign")

    @classmethod
    def for_lesion(cls, lesion: LesionMeasurements) -> Category:
        likelihood = lesion.malignant_probability
        if likelihood is None:  # findings written before the field existed
            likelihood = (lesion.probability if lesion.lesion_class == "malignant"
                          else 1.0 - lesion.probability)
        return cls.from_likelihood(likelihood)

    @property
    def wording(self) -> str:
        return f"BI-RADS-style category {self.value} ({self.meaning}), an AI suggestion"
