"""The report people read at a glance, as a PDF: the narrative, a table of lesions and their
measurements, each lesion's image with its outline beside the saliency map, the model, who wrote
the text, and the not-for-diagnostic-use statement. Drawn with matplotlib (TrueType fonts, so
the text stays text for pdftotext and screen readers); no identifier is printed in the body.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

from radlens.findings import LesionMeasurements, StudyFindings  # noqa: E402
from radlens.reporting.narrative import Category, Narrative  # noqa: E402

PAGE = (8.27, 11.69)  # A4 portrait, inches
STATEMENT = ("Research use only - NOT FOR DIAGNOSTIC USE. Produced automatically by radlens; "
             "to be reviewed by a qualified reader.")


@dataclass(frozen=True)
class Figure:
    """One frame for the report: the image with outlines, and the saliency overlay."""

    title: str
    image_rgb: np.ndarray  # (rows, columns, 3) uint8, outlines drawn
    overlay_rgb: np.ndarray  # (rows, columns, 3) uint8, heat map and outlines
    confidence: float = 0.0  # the frame's most probable lesion: key frames go first


def _size(lesion: LesionMeasurements) -> str:
    if lesion.longest_diameter_mm is None or lesion.perpendicular_diameter_mm is None:
        return f"{lesion.longest_diameter_px:.0f} x {lesion.perpendicular_diameter_px:.0f} px"
    return f"{lesion.longest_diameter_mm:.1f} x {lesion.perpendicular_diameter_mm:.1f} mm"


def lesion_rows(findings: StudyFindings) -> list[list[str]]:
    rows = []
    analysed = [image for image in findings.images if image.predictions]
    for image_number, image in enumerate(analysed, start=1):
        for prediction in image.predictions:
            for lesion in prediction.lesions:
                rows.append([
                    str(len(rows) + 1),
                    f"{image_number}" + (f"/{lesion.frame + 1}" if image.frames > 1 else ""),
                    lesion.lesion_class, f"{lesion.probability:.0%}", _size(lesion),
                    f"{lesion.area_mm2:.1f}" if lesion.area_mm2 is not None else "-",
                    f"{lesion.compactness:.2f}", f"{lesion.edge_sharpness:.1f}",
                    str(Category.for_lesion(lesion).value)])
    return rows


MAX_REASON_LINES = 8


def not_analysed_lines(findings: StudyFindings) -> list[str]:
    """Why each image (or some of its frames) was not analysed, one line each."""
    lines = []
    for number, image in enumerate(findings.images, start=1):
        if image.not_analysed:
            lines.append(f"Image {number} ({image.modality or 'no modality'}): "
                         f"{image.not_analysed}")
        elif image.abstained:
            lines.append(f"Image {number}: {len(image.abstained)} of "
                         f"{len(image.abstained) + len(image.predictions)} frame(s) unlike the "
                         "model's training images; nothing is stated for them")
    lines += [f"Object {skipped.ref.sop_instance_uid[-16:]}: {skipped.reason}"
              for skipped in findings.skipped]
    return lines


def render_report(findings: StudyFindings, narrative: Narrative,
                  figures: Sequence[Figure]) -> bytes:
    """The PDF's bytes."""
    model = (f"{findings.model.name} {findings.model.version} ({findings.model.architecture})"
             if findings.model else "no model")
    buffer = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 42, "font.size": 9}), \
            PdfPages(buffer, metadata={"Title": "radlens report", "Creator": "radlens",
                                       "CreationDate": datetime.now(UTC)}) as pdf:
        page = plt.figure(figsize=PAGE)
        y = 0.96
        page.text(0.06, y, "radlens report", fontsize=16, weight="bold")
        page.text(0.06, y - 0.022, STATEMENT, fontsize=8, color="#b00020")
        y -= 0.06
        page.text(0.06, y, "Narrative", fontsize=11, weight="bold")
        y -= 0.018
        for paragraph in narrative.text.splitlines():
            for line in textwrap.wrap(paragraph, 100) or [""]:
                page.text(0.06, y, line, fontsize=8.5)
                y -= 0.0145
        y -= 0.01
        rows = lesion_rows(findings)
        page.text(0.06, y, f"Lesions ({len(rows)})", fontsize=11, weight="bold")
        y -= 0.012
        if rows:
            height = 0.022 * (len(rows) + 1)
            axes = page.add_axes((0.06, y - height, 0.88, height))
            axes.axis("off")
            table = axes.table(cellText=rows, loc="upper left", cellLoc="center", colLabels=[
                "#", "image", "class", "prob.", "size", "area mm²", "compact.", "sharpness",
                "cat.*"])
            table.auto_set_font_size(False)
            table.set_fontsize(8)
            y -= height + 0.01
            page.text(0.06, y, "* BI-RADS-style category: an AI suggestion, not a BI-RADS "
                      "assessment.", fontsize=7.5, style="italic")
            y -= 0.02
        elif not any(image.predictions for image in findings.images):
            page.text(0.06, y - 0.01, "No image was analysed, so nothing is stated about this "
                      "study (the reasons are below, and in the SR).", fontsize=9)
            y -= 0.03
        else:
            page.text(0.06, y - 0.01, "No lesion was detected by the model.", fontsize=9)
            y -= 0.03
        reasons = not_analysed_lines(findings)
        if reasons:
            page.text(0.06, y, f"Not analysed ({len(reasons)})", fontsize=11, weight="bold")
            y -= 0.018
            for line in reasons[:MAX_REASON_LINES]:
                for wrapped in textwrap.wrap(line, 110):
                    page.text(0.06, y, wrapped, fontsize=8)
                    y -= 0.0135
            if len(reasons) > MAX_REASON_LINES:
                page.text(0.06, y, f"... and {len(reasons) - MAX_REASON_LINES} more (see the "
                          "SR).", fontsize=8)
                y -= 0.0135
            y -= 0.01
        for figure in figures:  # the key frames, most confident first
            if y < 0.3:
                break
            height = min(0.3, y - 0.09)
            for column, (picture, label) in enumerate(
                    ((figure.image_rgb, "image, lesion outlined"),
                     (figure.overlay_rgb, "saliency: where the model looked"))):
                axes = page.add_axes((0.06 + column * 0.45, y - height, 0.42, height - 0.02))
                axes.imshow(picture)
                axes.set_title(f"{figure.title}: {label}", fontsize=8)
                axes.axis("off")
            y -= height + 0.01
        page.text(0.06, 0.045, f"Model: {model}. Narrative written by: {narrative.author_line}.",
                  fontsize=7.5, wrap=True)
        page.text(0.06, 0.028, STATEMENT, fontsize=7.5, color="#b00020")
        pdf.savefig(page)
        plt.close(page)
    return buffer.getvalue()
