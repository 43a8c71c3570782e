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


def check_description_pattern(pattern: str | None) -> None:
    """ValueError unless ``pattern`` (a description criterion) is a regular expression."""
    if pattern is None:
        return
    import re

    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"description {pattern!r} is not a regular expression: {exc}"
                         ) from None


class SeriesSelection(BaseModel):
    """Which series of a study a model reads, from the headers, as MONAI Deploy's series
    selector picks them by attribute values and patterns: a brain study holds a localiser, a
    T2 and a T1 before and after contrast, and a model trained on one of them reads that one.
    Each criterion given must hold; a series failing one is not read, and the reason names
    the criterion."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    contrast: Literal["with", "without", "any"] = Field(
        "any", description="'with': ContrastBolusAgent must be stated; 'without': must not")
    scanning_sequences: list[str] = Field(
        default_factory=list, description="ScanningSequence values (SE, GR, IR, EP, RM); the "
        "header must state one of them")
    max_echo_time_ms: float | None = Field(
        None, gt=0, description="EchoTime at most (a T1 weighting's short echo)")
    description: str | None = Field(
        None, description="a regular expression searched case-insensitively in "
        "SeriesDescription")
    excluded_image_types: list[str] = Field(
        default_factory=lambda: ["LOCALIZER"],
        description="ImageType values that keep an image out (a localiser)")

    @model_validator(mode="after")
    def _pattern(self) -> SeriesSelection:
        check_description_pattern(self.description)
        return self

    def refusal(self, *, image_type: tuple[str, ...], contrast_agent: str,
                scanning_sequence: tuple[str, ...], echo_time_ms: float | None,
                series_description: str) -> str | None:
        """Why the image's series is not the one the model reads; None when it is."""
        import re

        excluded = [t for t in image_type if t.upper() in
                    {e.upper() for e in self.excluded_image_types}]
        if excluded:
            return f"image type {excluded[0]} (not a series the model reads)"
        if self.contrast == "with" and not contrast_agent:
            return "no contrast agent stated (the model reads series after contrast)"
        if self.contrast == "without" and contrast_agent:
            return f"contrast agent {contrast_agent} (the model reads series without contrast)"
        if self.scanning_sequences and not (
                {s.upper() for s in scanning_sequence}
                & {s.upper() for s in self.scanning_sequences}):
            stated = "\\".join(scanning_sequence) or "not stated"
            return (f"scanning sequence {stated} (the model reads "
                    f"{', '.join(self.scanning_sequences)})")
        if self.max_echo_time_ms is not None and (
                echo_time_ms is None or echo_time_ms > self.max_echo_time_ms):
            stated = "not stated" if echo_time_ms is None else f"{echo_time_ms:g} ms"
            return (f"echo time {stated} (the model reads echo times up to "
                    f"{self.max_echo_time_ms:g} ms)")
        if self.description is not None and not re.search(self.description,
                                                          series_description, re.IGNORECASE):
            return (f"series description {series_description!r} does not match "
                    f"{self.description!r}")
        return None

    def describe(self) -> str:
        parts = [f"{'with' if self.contrast == 'with' else 'without'} contrast"
                 if self.contrast != "any" else ""]
        if self.scanning_sequences:
            parts.append(f"sequence {'/'.join(self.scanning_sequences)}")
        if self.max_echo_time_ms is not None:
            parts.append(f"echo time up to {self.max_echo_time_ms:g} ms")
        if self.description is not None:
            parts.append(f"description matching {self.description!r}")
        if self.excluded_image_types:
            parts.append(f"no {'/'.join(self.excluded_image_types)} images")
        return ", ".join(p for p in parts if p)


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
    series: SeriesSelection | None = Field(
        None, description="which series of a study it reads; a card without it reads any")
    intended_use: str

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> ModelScope | None:
        scope = card.get("scope")
        return cls.model_validate(scope) if scope is not None else None
