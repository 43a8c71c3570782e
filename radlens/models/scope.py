"""The scope a model's card states (modalities, body parts and anatomic regions, SOP classes,
photometric interpretations, the image geometry, the intended use), for every task. No torch
here: the agent's routing reads it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ImageGeometry(BaseModel):
    """The pixel matrices a model was built for: a header can say MG BREAST over any pixels,
    and a model handed a matrix unlike any it was trained on answers anyway (a real radiograph
    relabelled MG got a density category with probability 0.98), so the card states them and
    routing refuses what lies outside."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    frames: Literal["single", "any"] = Field(
        "any", description="'single': one frame per image (multi-frame objects are refused)")
    min_size: int = Field(1, ge=1, description="the shorter side, in pixels, at least")
    max_size: int = Field(65535, ge=1, description="the longer side, in pixels, at most")
    min_bits_stored: int = Field(1, ge=1, le=32)
    max_bits_stored: int = Field(32, ge=1, le=32)

    @model_validator(mode="after")
    def _ranges(self) -> ImageGeometry:
        if self.min_size > self.max_size:
            raise ValueError(f"min_size {self.min_size} is above max_size {self.max_size}")
        if self.min_bits_stored > self.max_bits_stored:
            raise ValueError(f"min_bits_stored {self.min_bits_stored} is above "
                             f"max_bits_stored {self.max_bits_stored}")
        return self

    def refusal(self, *, frames: int, rows: int, columns: int, bits_stored: int) -> str | None:
        """Why an image's pixels are not what the model reads; None when they are. Values the
        header does not state (0) are not held against it: decoding judges those."""
        if self.frames == "single" and frames > 1:
            return f"multi-frame ({frames} frames; the model reads single images)"
        if rows and columns:
            short, long = sorted((rows, columns))
            if short < self.min_size or long > self.max_size:
                return (f"matrix {rows}x{columns} (the model reads "
                        f"{self.min_size} to {self.max_size} pixels a side)")
        if bits_stored and not self.min_bits_stored <= bits_stored <= self.max_bits_stored:
            return (f"bits stored {bits_stored} (the model reads "
                    f"{self.min_bits_stored} to {self.max_bits_stored})")
        return None

    def describe(self) -> str:
        """In words, for card.md and ``radlens models``."""
        frames = "single images" if self.frames == "single" else "single or multi-frame"
        return (f"{frames}, {self.min_size} to {self.max_size} pixels a side, "
                f"{self.min_bits_stored} to {self.max_bits_stored} bits stored")


class AnatomicRegion(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    value: str
    scheme: str = "SCT"
    meaning: str


class ModelScope(BaseModel):
    """What a model was built for, as its card states it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    modalities: list[str] = Field(min_length=1)
    body_parts: list[str] = Field(min_length=1, description="BodyPartExamined values")
    anatomic_regions: list[AnatomicRegion] = Field(min_length=1)
    sop_classes: list[str] = Field(min_length=1, description="SOP Class UIDs")
    photometric_interpretations: list[str] = Field(min_length=1)
    geometry: ImageGeometry | None = Field(
        None, description="the pixel matrices it reads; a card without it is not checked")
    intended_use: str

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> ModelScope | None:
        scope = card.get("scope")
        return cls.model_validate(scope) if scope is not None else None
