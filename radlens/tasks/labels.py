"""The labels of a model's label map, as a configuration or a bundle's metadata states them:
plain pydantic models, so the configuration can name them without loading any task."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LabelCode(BaseModel):
    """A coded concept for a label (SNOMED CT, DCM): the segment's property type."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class LabelDefinition(BaseModel):
    """One label of a model's output: its value, its name and, when known, its code."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: int = Field(ge=1, le=65535)
    name: str = Field(min_length=1, max_length=64)
    code: LabelCode | None = None
