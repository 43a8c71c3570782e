"""Coded concepts the breast density task writes: DICOM's own where the standard has one."""

from __future__ import annotations

from pydicom.sr.coding import Code

MAMMOGRAPHY = Code("71651007", "SCT", "Mammography")
BREAST = Code("76752008", "SCT", "Breast")
BREAST_COMPOSITION = Code("129715009", "SCT", "Breast composition")
BREAST_COMPOSITION_VALUES: dict[str, Code] = {  # CID 6000 Overall Breast Composition
    "A": Code("129716005", "SCT", "Almost entirely fat"),
    "B": Code("129717001", "SCT", "Scattered fibroglandular densities"),
    "C": Code("129718006", "SCT", "Heterogeneously dense"),
    "D": Code("129719003", "SCT", "Extremely dense"),
}
IMAGE_VIEW = Code("111031", "DCM", "Image View")
VIEWS: dict[str, Code] = {  # CID 4014 View for Mammography
    "CC": Code("399162004", "SCT", "cranio-caudal"),
    "MLO": Code("399368009", "SCT", "medio-lateral oblique"),
    "ML": Code("399260004", "SCT", "medial-lateral"),
    "LM": Code("399352003", "SCT", "lateral-medial"),
}
DENSITY_PROBABILITY: dict[str, Code] = {
    c: Code(f"RADL05{i}", "99RADLENS", f"Probability of breast composition {c}")
    for i, c in enumerate("ABCD", start=1)}
ATTENTION_ON_TISSUE = Code("RADL070", "99RADLENS", "Grad-CAM share on breast tissue")
ATTENTION_ON_ARTIFACTS = Code("RADL071", "99RADLENS", "Grad-CAM share on artifacts")
ATTENTION_OUTSIDE = Code("RADL072", "99RADLENS", "Grad-CAM share outside the breast")
ATTENTION_WARNING = Code("RADL073", "99RADLENS", "Attention warning")
ATTENTION_ON_ARTIFACT = Code("RADL074", "99RADLENS", "Attention on artifact")


PRIVATE_REASONS: dict[str, str] = {
    **dict.fromkeys(("RADL051", "RADL052", "RADL053", "RADL054"),
                    "CID 6000 codes the category itself (used); its probability has no concept"),
    **dict.fromkeys(("RADL070", "RADL071", "RADL072", "RADL073", "RADL074"),
                    "no concept for where a Grad-CAM's attention lies"),
}
