"""The dermoscopy model's scope, as ``radlens train`` writes it into the card, and the check
that an image is a dermoscopic photograph at all.

The model's out-of-distribution score (the Mahalanobis distance of its pooled image feature)
judges whether an image is like its training photographs; the plausibility check comes
before it, because an image of another kind can pass a learnt score by chance: a dermoscopic
photograph is in colour (a greyscale image stored as RGB, such as an ultrasound frame, is
not one), and most of its coloured pixels are skin or pigment, whose hues lie between red
and yellow-brown (colour bars, Doppler overlays and text in primary colours are not). The
thresholds hold for skin of every Fitzpatrick type, whose hue stays in that range while its
saturation and value change.
"""

from __future__ import annotations

from typing import Any

import numpy as np

DERMOSCOPIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.7"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"

# Where on the body a pigmented lesion is photographed: the skin, and the sites a
# dermatoscope's Anatomic Region Sequence names (SNOMED CT, from pydicom's code dictionary).
SKIN_SITES = ("Skin", "Scalp", "Face", "Ear", "Nose", "Lip", "Neck", "Trunk", "Chest", "Back",
              "Abdomen", "Axilla", "Breast", "Buttock", "Shoulder", "UpperLimb", "UpperArm",
              "Forearm", "Hand", "LowerLimb", "Thigh", "Knee", "LowerLeg", "Foot")


def _regions() -> list[dict[str, str]]:
    from pydicom.sr.codedict import codes

    return [{"value": code.value, "scheme": code.scheme_designator, "meaning": code.meaning}
            for code in (getattr(codes.SCT, name) for name in SKIN_SITES)]


DERMOSCOPY_SCOPE: dict[str, Any] = {
    "modalities": ["DMS", "XC"],
    "body_parts": ["SKIN"],
    "anatomic_regions": _regions(),
    "sop_classes": [DERMOSCOPIC_PHOTOGRAPHY, VL_PHOTOGRAPHIC],
    "photometric_interpretations": ["RGB", "YBR_FULL_422", "YBR_FULL"],
    "geometry": {"frames": "single", "min_size": 64, "max_size": 8000, "min_bits_stored": 8,
                 "max_bits_stored": 8},
    "intended_use": "melanoma against nevus on dermoscopic photographs of single pigmented "
                    "skin lesions, with the lesion's ABC(D) measurements; research only, not "
                    "for diagnostic use",
}

LIT = 0.10  # value below which a pixel is the dark rim or background, not skin
COLOURED = 0.08  # saturation from which a pixel has a colour at all
MIN_COLOURED_SHARE = 0.5  # of the lit pixels
MIN_SKIN_SHARE = 0.6  # of the coloured pixels: hue between red and yellow-brown
MIN_LIT_SHARE = 0.3  # of the frame
SKIN_HUES = ((0.0, 0.14), (0.90, 1.0))  # in turns of the colour circle


def not_a_dermoscopic_photograph(image: np.ndarray) -> str | None:
    """Why an (H, W, 3) uint8 image cannot be a dermoscopic photograph, or None."""
    from skimage.color import rgb2hsv

    if image.ndim != 3 or image.shape[2] != 3:
        return f"not a colour image (shape {image.shape})"
    step = max(1, max(image.shape[:2]) // 256)  # a 256-pixel view is enough to judge
    hsv = rgb2hsv(np.ascontiguousarray(image[::step, ::step]))
    hue, saturation, value = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    lit = value > LIT
    if lit.mean() < MIN_LIT_SHARE:
        return (f"mostly dark ({lit.mean():.0%} of the image is lit; a dermoscopic "
                f"photograph's skin fills {MIN_LIT_SHARE:.0%} or more)")
    coloured = lit & (saturation >= COLOURED)
    share = coloured.sum() / lit.sum()
    if share < MIN_COLOURED_SHARE:
        return (f"no colour ({share:.0%} of its lit pixels have any; skin and pigment give "
                f"{MIN_COLOURED_SHARE:.0%} or more): a greyscale image stored as colour")
    skin = coloured & np.logical_or.reduce([(hue >= low) & (hue <= high)
                                            for low, high in SKIN_HUES])
    skin_share = skin.sum() / coloured.sum()
    if skin_share < MIN_SKIN_SHARE:
        return (f"not skin-coloured ({skin_share:.0%} of its coloured pixels have hues of "
                f"skin or pigment, a dermoscopic photograph's {MIN_SKIN_SHARE:.0%} or more)")
    return None
