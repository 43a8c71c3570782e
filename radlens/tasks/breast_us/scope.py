"""The lesion model's scope, as ``radlens train`` writes it into the card."""

from __future__ import annotations

from typing import Any

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"

BREAST_ULTRASOUND_SCOPE: dict[str, Any] = {
    "modalities": ["US"],
    "body_parts": ["BREAST"],
    "anatomic_regions": [{"value": "76752008", "scheme": "SCT", "meaning": "Breast"}],
    "sop_classes": [US_IMAGE_STORAGE, US_MULTIFRAME_IMAGE_STORAGE],
    "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL",
                                    "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT",
                                    "PALETTE COLOR"],
    # Frames of any size it resizes to its input; clips frame by frame; 8-bit phantoms, and
    # 16-bit ultrasound decodes to the same scale. Smaller than 64 pixels a side is no B-mode.
    "geometry": {"frames": "any", "min_size": 64, "max_size": 4096, "min_bits_stored": 8,
                 "max_bits_stored": 16},
    "intended_use": ("Research and demonstration only, not for diagnostic use: segments and "
                     "classifies focal lesions (benign- or malignant-appearing) in 2-D B-mode "
                     "breast ultrasound. Trained on synthetic phantoms only; it has never seen "
                     "a real patient's image."),
}
