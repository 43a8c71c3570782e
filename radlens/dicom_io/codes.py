"""Coded concepts radlens writes into its DICOM outputs (SNOMED CT, DCM, UCUM, LOINC).

Kept in one place so the SEG, the SR and the maps say the same thing in the same words; a task
keeps the concepts only it writes in its own ``codes`` module (``tasks_codes`` gathers them).
"""

from __future__ import annotations

from pydicom.sr.coding import Code

# SEG: segmented property category and type (CID 7150 / CID 7151 family).
MORPHOLOGICALLY_ALTERED_STRUCTURE = Code("49755003", "SCT", "Morphologically Altered Structure")

# Algorithm family for AlgorithmIdentification.
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")

# SR: procedure reported and anatomy.
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging")  # a study none of whose images ran
# TID 1500 row 10: the container a report without measurements carries instead of row 6.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
ANALYSIS_OUTCOME = Code("RADL044", "99RADLENS", "Analysis outcome")
NO_IMAGE_ANALYSED = Code("RADL045", "99RADLENS", "No image analysed")
ANALYSIS_FAILED = Code("RADL046", "99RADLENS", "Analysis failed")
OOD_SCORE = Code("RADL033", "99RADLENS", "Out-of-distribution score")
OOD_THRESHOLD = Code("RADL034", "99RADLENS", "Out-of-distribution threshold")
LESION = Code("52988006", "SCT", "Lesion")

# SR measurement concepts (DCM / SCT) and their UCUM units.
AREA = Code("42798000", "SCT", "Area")
PERIMETER = Code("131191004", "SCT", "Perimeter")
LONG_AXIS = Code("103339001", "SCT", "Long Axis")
SHORT_AXIS = Code("103340004", "SCT", "Short Axis")
MEAN_INTENSITY = Code("RADL006", "99RADLENS", "Mean intensity")
INTENSITY_SD = Code("RADL007", "99RADLENS", "Intensity standard deviation")
COMPACTNESS = Code("RADL001", "99RADLENS", "Compactness 4*pi*A/P^2")
EDGE_SHARPNESS = Code("RADL002", "99RADLENS", "Edge sharpness")
ASYMMETRY = Code("RADL003", "99RADLENS", "Asymmetry about principal axes")
BORDER_IRREGULARITY = Code("RADL004", "99RADLENS", "Border irregularity")
ELONGATION = Code("RADL005", "99RADLENS", "Elongation")
CLASS_PROBABILITY = Code("RADL010", "99RADLENS", "Class probability")
SALIENCY_DICE = Code("RADL020", "99RADLENS", "Saliency agreement Dice")
SALIENCY_MASS_INSIDE = Code("RADL021", "99RADLENS", "Saliency mass inside lesion")
SALIENCY_METHODS: dict[str, Code] = {  # the measurement method of a saliency figure
    method: Code(f"RADL06{digit}", "99RADLENS", method)
    for digit, method in enumerate(("gradcam", "gradcam++", "occlusion", "prototype"), start=1)}
NARRATIVE = Code("121073", "DCM", "Impression")
SALIENCY = Code("130404", "DCM", "Saliency")  # the quantity of the saliency Parametric Map
NOT_FOR_DIAGNOSTIC_USE = Code("RADL040", "99RADLENS", "Not for diagnostic use")
NARRATIVE_AUTHOR = Code("RADL041", "99RADLENS", "Narrative author")

VOLUME = Code("118565006", "SCT", "Volume")
TISSUE = Code("85756007", "SCT", "Tissue")  # a segment's category when its label has no code
UCUM_ML = Code("ml", "UCUM", "milliliter")
UCUM_MM = Code("mm", "UCUM", "millimeter")
UCUM_MM2 = Code("mm2", "UCUM", "square millimeter")
UCUM_NO_UNITS = Code("1", "UCUM", "no units")
UCUM_GREY_PER_PIXEL = Code("{grey level}/{pixel}", "UCUM", "grey levels per pixel")
UCUM_GREY = Code("{grey level}", "UCUM", "grey level")
REFERENCED_SEGMENT = Code("121191", "DCM", "Referenced Segment")
REPORT_NOTE = Code("RADL043", "99RADLENS", "Processing note")
UCUM_PIXELS = Code("{pixels}", "UCUM", "pixels")
UCUM_SQUARE_PIXELS = Code("{pixels}2", "UCUM", "square pixels")

IMAGE_LATERALITY = Code("111027", "DCM", "Image Laterality")
LATERALITY = Code("272741003", "SCT", "Laterality")
SIDES: dict[str, Code] = {"L": Code("7771000", "SCT", "Left"),
                          "R": Code("24028007", "SCT", "Right")}

# Why each concept of radlens's own stays in the private scheme: DICOM (PS3.16) and SNOMED CT
# were searched for each (pydicom's code dictionaries list both); where one has the concept it
# is used above instead. The Conformance Statement prints this table.
PRIVATE_REASONS: dict[str, str] = {
    **dict.fromkeys(("RADL001", "RADL002", "RADL003", "RADL004", "RADL005"),
                    "a shape descriptor of radlens's own formula; no DICOM or SNOMED CT concept"),
    **dict.fromkeys(("RADL006", "RADL007"),
                    "B-mode grey levels are no physical quantity: no concept to qualify with "
                    "a mean or standard deviation"),
    "RADL010": "the probability of the model's predicted class, whatever the class",
    **dict.fromkeys(("RADL020", "RADL021"), "no concept for the agreement of a saliency map "
                    "with a segmentation"),
    **dict.fromkeys(("RADL061", "RADL062", "RADL063", "RADL064"),
                    "no concept for these explanation methods"),
    **dict.fromkeys(("RADL033", "RADL034"), "no concept for an out-of-distribution score"),
    "RADL040": "no concept for a not-for-diagnostic-use statement",
    "RADL041": "no concept for who wrote a narrative (an LLM or the template) and why",
    "RADL043": "a processing note of this node (what was not analysed and why)",
    **dict.fromkeys(("RADL044", "RADL045", "RADL046"),
                    "no concept for the outcome of an automated analysis"),
}


def codes_in(module: object) -> list[Code]:
    """Every Code a codes module defines, those grouped in mappings included."""
    found: list[Code] = []
    for value in vars(module).values():
        if isinstance(value, Code):
            found.append(value)
        elif isinstance(value, dict):
            found += [v for v in value.values() if isinstance(v, Code)]
    return found


def all_codes() -> list[Code]:
    """The concepts any radlens output may carry: these and every installed task's."""
    import sys

    from radlens.tasks.registry import all_tasks

    found = codes_in(sys.modules[__name__])
    for task in all_tasks():
        for module in task.code_modules():
            found += codes_in(module)
    return found


def private_reasons() -> dict[str, str]:
    """Why each private concept stays private, these and every installed task's."""
    from radlens.tasks.registry import all_tasks

    reasons = dict(PRIVATE_REASONS)
    for task in all_tasks():
        for module in task.code_modules():
            reasons.update(getattr(module, "PRIVATE_REASONS", {}))
    return reasons
