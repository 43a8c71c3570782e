"""Coded concepts only the breast ultrasound lesion task writes."""

from __future__ import annotations

from pydicom.sr.coding import Code

# SEG: the segmented property type of each lesion class (CID 7151 family), and its label value.
LESION_TYPES: dict[str, Code] = {
    "benign": Code("3898006", "SCT", "Neoplasm, benign"),
    "malignant": Code("86049000", "SCT", "Neoplasm, Malignant (Primary)"),
}
LESION_CLASS_VALUE: dict[str, int] = {"benign": 1, "malignant": 2}

# SR: procedure reported and anatomy.
ULTRASONOGRAPHY_OF_BREAST = Code("47079000", "SCT", "Ultrasonography of breast")
BREAST = Code("76752008", "SCT", "Breast")

# SR: the model's reading of a frame and a lesion.
PREDICTED_CLASS = Code("RADL011", "99RADLENS", "Predicted lesion class")
AI_CATEGORY_SUGGESTION = Code("RADL012", "99RADLENS", "BI-RADS-style category (AI suggestion)")
NORMAL_PROBABILITY = Code("RADL030", "99RADLENS", "Probability of normal image")
BENIGN_PROBABILITY = Code("RADL031", "99RADLENS", "Probability of benign lesion")
MALIGNANT_PROBABILITY = Code("111047", "DCM", "Probability of cancer")


PRIVATE_REASONS: dict[str, str] = {
    "RADL011": "the model's own class names (normal, benign, malignant)",
    "RADL012": "worded as an AI suggestion on purpose: DICOM's BI-RADS assessment codes state "
               "a reader's assessment",
    **dict.fromkeys(("RADL030", "RADL031"),
                    "no concept for the probability of a normal image or of a benign lesion "
                    "(the malignant one is DCM 111047 Probability of cancer)"),
}
