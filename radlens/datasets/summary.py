"""What a task read in a folder, as ``radlens dataset check`` prints it: one shape for every
task, so the command needs to know none of them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetSummary:
    """A folder as read: its layout (and why that one), the cases and patients, the count of
    each label, and tables of counts (mask values, pixels per class, sizes, spacings...)."""

    folder: str
    layout: str
    how: str
    cases: int
    patients: int
    labels: Mapping[str, int]
    tables: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def segmentation_summary(dataset: object) -> DatasetSummary:
    """A segmentation folder's summary (``radlens.datasets.segmentation``)."""
    from radlens.datasets.segmentation import LAYOUTS, SegmentationDataset

    assert isinstance(dataset, SegmentationDataset)
    notes = [f"layout {dataset.layout}: {LAYOUTS[dataset.layout]}"]
    if dataset.unlisted:
        notes.append(f"{len(dataset.unlisted)} case(s) not in labels.csv, labelled from their "
                     f"masks: {', '.join(dataset.unlisted[:5])}"
                     + (" ..." if len(dataset.unlisted) > 5 else ""))
    if "not stated" in dataset.spacings:
        notes.append("images without a stated pixel spacing get no measurement in mm "
                     "(labels.csv pixel_spacing_mm, or NIfTI headers, state it)")

    def by_value(counts: Mapping[str, int]) -> dict[str, int]:
        return dict(sorted(counts.items(), key=lambda item: (not item[0].isdigit(),
                                                             int(item[0]) if item[0].isdigit()
                                                             else 0, item[0])))

    return DatasetSummary(
        folder=str(dataset.root), layout=dataset.layout, how=dataset.how,
        cases=len(dataset.cases), patients=len({c.patient_id for c in dataset.cases}),
        labels=dataset.label_counts(),
        tables={"mask values (pixels)": by_value(dataset.mask_values),
                "pixels per class": dict(dataset.class_pixels),
                "image sizes (rows x columns)": dict(dataset.sizes.most_common()),
                "pixel spacings": dict(dataset.spacings.most_common())},
        notes=tuple(notes))
