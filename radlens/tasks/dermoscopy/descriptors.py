"""The fixed list of dermoscopic descriptors the dermoscopy task may name, and which of them
contradict which.

The list is the vocabulary of the visual-feature retrieval (an image-text model ranks these
phrases), of the phantoms' ground truth (each phantom records which of them are true of it),
of the SR's qualitative evaluations and of the narrative's grounding: a report may name a
descriptor only when the findings hold it, and never one that contradicts a measurement.
Descriptors come in three kinds: the complementary pairs of the ABC rule (exactly one of each
pair is true of a lesion), the pigment network (regular or atypical), and structures that are
either present or not.
"""

from __future__ import annotations

from typing import Literal, get_args

Descriptor = Literal[
    "asymmetric shape", "symmetric shape",
    "irregular border", "regular border",
    "multiple colours", "one or two colours",
    "regular pigment network", "atypical pigment network",
    "blue-gray areas", "white regression areas", "black dots or blotches", "red areas",
    "streaks",
]

DESCRIPTORS: tuple[Descriptor, ...] = get_args(Descriptor)

# Pairs of which exactly one describes a lesion (the first is the one melanoma shows).
COMPLEMENTARY: tuple[tuple[Descriptor, Descriptor], ...] = (
    ("asymmetric shape", "symmetric shape"),
    ("irregular border", "regular border"),
    ("multiple colours", "one or two colours"),
    ("atypical pigment network", "regular pigment network"),
)

# The descriptors that speak for melanoma (the dermoscopic warning signs).
SUSPICIOUS: frozenset[Descriptor] = frozenset({
    "asymmetric shape", "irregular border", "multiple colours", "atypical pigment network",
    "blue-gray areas", "white regression areas", "black dots or blotches", "red areas",
    "streaks"})

# The colours of dermoscopy (the "C" of the ABCD rule counts how many a lesion shows).
COLOURS: tuple[str, ...] = ("light brown", "dark brown", "black", "blue-gray", "white", "red")


def opposite(descriptor: str) -> str | None:
    """The descriptor of the same pair that ``descriptor`` excludes (None: it has none)."""
    for first, second in COMPLEMENTARY:
        if descriptor == first:
            return second
        if descriptor == second:
            return first
    return None


def ranked(scores: dict[str, float], top: int = 3) -> list[str]:
    """The ``top`` descriptors by score, a descriptor left out when the other of its pair
    scores higher (a lesion is not both symmetric and asymmetric)."""
    kept = [name for name in sorted(scores, key=scores.__getitem__, reverse=True)
            if (other := opposite(name)) is None or scores.get(other, float("-inf"))
            <= scores[name]]
    return kept[:top]


def precision_at(retrieved: list[str], truth: set[str]) -> float:
    """The share of the retrieved descriptors that are true (precision at k, k their
    count)."""
    return sum(name in truth for name in retrieved) / len(retrieved) if retrieved else 0.0
