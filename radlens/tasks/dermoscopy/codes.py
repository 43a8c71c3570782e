"""Coded concepts the dermoscopy task writes: DICOM's and SNOMED CT's own where they have one
(skin lesion, diameter, dermoscopic photography, melanoma), private
``99RADLENS`` codes where they have none, each with its reason."""

from __future__ import annotations

from pydicom.sr.coding import Code

from radlens.tasks.dermoscopy.descriptors import DESCRIPTORS

DERMOSCOPIC_PHOTOGRAPHY = Code("446078004", "SCT", "Dermoscopic photography")
SKIN_LESION = Code("95324001", "SCT", "Skin lesion")
SKIN = Code("39937001", "SCT", "Skin")
DIAMETER = Code("81827009", "SCT", "Diameter")
MALIGNANT_MELANOMA = Code("1162635006", "SCT", "Malignant melanoma")

MELANOMA_PROBABILITY = Code("RADL080", "99RADLENS", "Probability of melanoma")
ASSESSMENT = Code("RADL081", "99RADLENS", "Dermoscopic AI assessment")
NEVUS = Code("RADL082", "99RADLENS", "Nevus, no sign of melanoma")
BORDER_CURVATURE = Code("RADL083", "99RADLENS", "Border mean curvature")
BORDER_TURNS = Code("RADL084", "99RADLENS", "Border total turning")
HUE_SD = Code("RADL085", "99RADLENS", "Hue standard deviation")
SATURATION_SD = Code("RADL086", "99RADLENS", "Saturation standard deviation")
VALUE_SD = Code("RADL087", "99RADLENS", "Value standard deviation")
# Each feature's level of the ABC(D) rule, 1 (least) to 5 (most suspicious).
LEVELS: dict[str, Code] = {
    "asymmetry": Code("RADL088", "99RADLENS", "Asymmetry level (1-5)"),
    "border": Code("RADL126", "99RADLENS", "Border irregularity level (1-5)"),
    "colour": Code("RADL127", "99RADLENS", "Colour variegation level (1-5)"),
    "diameter_mm": Code("RADL128", "99RADLENS", "Diameter level (1-5)"),
}
UCUM_PER_MM = Code("/mm", "UCUM", "per millimeter")
UCUM_PER_PIXEL = Code("/{pixel}", "UCUM", "per pixel")
ATTENTION_ON_LESION = Code("RADL089", "99RADLENS", "Grad-CAM share on the lesion")
ALIGNMENT = Code("RADL090", "99RADLENS", "Image-feature embedding similarity")
DERMOSCOPIC_FEATURE = Code("RADL091", "99RADLENS", "Dermoscopic feature")
DESCRIPTOR_SIMILARITY = Code("RADL092", "99RADLENS", "Descriptor similarity")
# One per descriptor: RADL093-099, then RADL120-125 (RADL100-119 are the lesion task's).
_DESCRIPTOR_NUMBERS = (*range(93, 100), *range(120, 126))
DESCRIPTOR_CODES: dict[str, Code] = {
    name: Code(f"RADL{number:03d}", "99RADLENS", name[0].upper() + name[1:])
    for number, name in zip(_DESCRIPTOR_NUMBERS, DESCRIPTORS, strict=True)}

# The change since the patient's prior visit of the lesion (radlens.history): one per value.
CHANGE_SINCE_PRIOR: dict[str, Code] = {
    "asymmetry": Code("RADL129", "99RADLENS", "Asymmetry change since prior visit"),
    "border_turns": Code("RADL130", "99RADLENS", "Border total turning change since prior "
                         "visit"),
    "border_per_mm": Code("RADL131", "99RADLENS", "Border mean curvature change since prior "
                          "visit"),
    "colour_score": Code("RADL132", "99RADLENS", "Colour score change since prior visit"),
    "diameter_mm": Code("RADL133", "99RADLENS", "Diameter change since prior visit"),
    "area_mm2": Code("RADL134", "99RADLENS", "Area change since prior visit"),
    "melanoma_probability": Code("RADL135", "99RADLENS", "Probability of melanoma change "
                                 "since prior visit"),
}
PRIOR_VISIT_DATE = Code("RADL136", "99RADLENS", "Study date of the prior visit compared")
PRIOR_VISIT_STUDY = Code("RADL137", "99RADLENS", "Study Instance UID of the prior visit "
                         "compared")
COLOUR_SCORE = Code("RADL138", "99RADLENS", "Colour score (sum of HSV standard deviations)")

PRIVATE_REASONS: dict[str, str] = {
    "RADL080": "no concept for a model's probability of melanoma",
    "RADL081": "no concept for an AI's two-way dermoscopic assessment",
    "RADL082": "no SNOMED CT concept in DICOM's dictionary for a melanocytic nevus as an "
               "assessment",
    "RADL083": "no concept for the mean curvature along a lesion's border",
    "RADL084": "no concept for a border's total absolute turning",
    **dict.fromkeys(("RADL085", "RADL086", "RADL087"),
                    "DCM 130832 names the lesion's colour, not the spread of hue, saturation "
                    "or value inside it"),
    **dict.fromkeys(("RADL088", "RADL126", "RADL127", "RADL128"),
                    "no concept for the ABC(D) rule's five severity levels"),
    "RADL089": "no concept for where a Grad-CAM's attention lies",
    "RADL090": "no concept for the cosine similarity of an image and its features' embeddings",
    "RADL091": "no concept for a dermoscopic structure as a finding's property",
    "RADL092": "no concept for an image-text similarity",
    **dict.fromkeys((code.value for code in CHANGE_SINCE_PRIOR.values()),
                    "no concept for the change of a lesion's measurement between two visits "
                    "(DICOM's longitudinal templates track a finding across studies, not the "
                    "difference of one value)"),
    "RADL136": "DCM 111060 (Study Date) would read as this study's date inside the group",
    "RADL137": "DCM 110180 (Study Instance UID) would read as this study's inside the group",
    "RADL138": "no concept for the sum of a lesion's hue, saturation and value spreads",
    **dict.fromkeys((code.value for code in DESCRIPTOR_CODES.values()),
                    "the dermoscopic descriptors (structures, colours, symmetry) have no DICOM "
                    "or SNOMED CT concept in DICOM's dictionary"),
}
