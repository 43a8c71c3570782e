"""The lesion task's classes as its datasets code them, in a module that needs neither torch
nor MONAI: ``radlens dataset check`` reads a folder with these alone, in a second instead of
the five that importing the training stack takes."""

from __future__ import annotations

from radlens.datasets.segmentation import MaskClasses

LABELS = ("normal", "benign", "malignant")
# Mask values 0, 1, 2; in colour masks benign is green (channel 1), malignant red (channel 0).
LESION_MASKS = MaskClasses(names=("background", "benign", "malignant"), image_labels=LABELS,
                           colours={1: 1, 2: 0})
