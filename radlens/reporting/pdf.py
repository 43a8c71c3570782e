"""The report people read at a glance, as a PDF: the narrative, a table of lesions and their
measurements, each lesion's image with its outline beside the saliency map, the model, who wrote
the text, and the not-for-diagnostic-use statement. Drawn with matplotlib; no identifier is
printed in the body. The fonts are embedded as Type 3 subsets with a ToUnicode map, so the text
stays text for pdftotext and screen readers: a one-page report renders in about 0.3 s, where
TrueType (Type 42) subsets cost 0.7 s (fontTools subsetting four fonts per report).
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
    captions: tuple[str, str] = ("image, lesion outlined", "saliency: where the model looked")


def _size(lesion: LesionMeasurements) -> str:
    if lesion.longest_diameter_mm is None or lesion.perpendicular_diameter_mm is None:
        return f"{lesion.longest_diameter_px:.0f} x {lesion.perpendicular_diameter_px:.0f} px"
    return f"{lesion.longest_diameter_mm:.1f} x {lesion.perpendicular_diameter_mm:.1f} mm"


MAX_TABLE_ROWS = 10  # the PDF is a summary with key frames; the SR carries every lesion


def lesion_rows(findings: StudyFindings) -> list[list[str]]:
    """One row per lesion, numbered as in the SR and the narrative."""
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


def density_rows(findings: StudyFindings) -> list[list[str]]:
    """One row per mammogram the density model read: side, view, category, attention."""
    rows = []
    for number, image in enumerate(findings.images, start=1):
        reading = image.density
        if reading is None:
            continue
        rows.append([str(number), reading.laterality or "-", reading.view or "-",
                     reading.category, f"{reading.probabilities[reading.category]:.0%}",
                     f"{reading.attention.tissue:.0%}",
                     "attention on artifacts" if reading.attention_on_artifact else "-"])
    return rows


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


BOTTOM = 0.075  # the footer sits below this on every page


class _Pages:
    """The report's pages: a new one whenever the next block would run into the footer."""

    def __init__(self, pdf: PdfPages, footer: str) -> None:
        self.pdf, self.footer = pdf, footer
        self.page: plt.Figure | None = None
        self.y = 0.0
        self.count = 0

    def need(self, height: float) -> plt.Figure:
        """The page to draw the next ``height`` on (the current one if it fits)."""
        if self.page is None or self.y - height < BOTTOM:
            self.close()
            self.page = plt.figure(figsize=PAGE)
            self.count += 1
            self.y = 0.96 if self.count == 1 else 0.95
        return self.page

    def close(self) -> None:
        if self.page is None:
            return
        self.page.text(0.06, 0.045, self.footer, fontsize=7.5, wrap=True)
        self.page.text(0.06, 0.028, STATEMENT, fontsize=7.5, color="#b00020")
        if self.count > 1:
            self.page.text(0.9, 0.028, f"page {self.count}", fontsize=7.5)
        self.pdf.savefig(self.page)
        plt.close(self.page)
        self.page = None

    def line(self, text: str, height: float, x: float = 0.06, **style: object) -> None:
        page = self.need(height)
        page.text(x, self.y, text, **style)
        self.y -= height


def _lesion_table(pages: _Pages, findings: StudyFindings, rows: list[list[str]]) -> None:
    """The lesion table (the most suspicious lesions), or why there is none."""
    shown = rows
    if len(rows) > MAX_TABLE_ROWS:  # the most suspicious first: category, probability
        shown = sorted(rows, key=lambda r: (-int(r[8]), -float(r[3].rstrip("%"))))[
            :MAX_TABLE_ROWS]
    height = 0.022 * (len(shown) + 1) if shown else 0.0
    page = pages.need(0.03 + height + 0.03)
    page.text(0.06, pages.y, f"Lesions ({len(rows)})", fontsize=11, weight="bold")
    if len(rows) > len(shown):
        page.text(0.3, pages.y, f"the {MAX_TABLE_ROWS} most suspicious shown; every "
                  "lesion is in the SR", fontsize=8, style="italic")
    pages.y -= 0.012
    if shown:
        axes = page.add_axes((0.06, pages.y - height, 0.88, height))
        axes.axis("off")
        table = axes.table(cellText=shown, loc="upper left", cellLoc="center", colLabels=[
            "#", "image", "class", "prob.", "size", "area mm²", "compact.", "sharpness",
            "cat.*"])
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        pages.y -= height + 0.01
        pages.line("* BI-RADS-style category: an AI suggestion, not a BI-RADS assessment.",
                   0.02, fontsize=7.5, style="italic")
    elif not any(image.predictions for image in findings.images):
        pages.y -= 0.01
        pages.line("No image was analysed, so nothing is stated about this study (the "
                   "reasons are below, and in the SR).", 0.02, fontsize=9)
    else:
        pages.y -= 0.01
        pages.line("No lesion was detected by the model.", 0.02, fontsize=9)


def render_report(findings: StudyFindings, narrative: Narrative,
                  figures: Sequence[Figure]) -> bytes:
    """The PDF's bytes: the narrative, the lesion table (the most suspicious lesions), what
    was not analysed and why, and the key frames; as many pages as that takes."""
    model = (f"{findings.model.name} {findings.model.version} ({findings.model.architecture})"
             if findings.model else "no model")
    density = density_rows(findings)
    readings = [image.density for image in findings.images if image.density is not None]
    if readings:
        model += f"; density: {readings[0].model.name} {readings[0].model.version}"
    buffer = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 3, "font.size": 9}), \
            PdfPages(buffer, metadata={"Title": "radlens report", "Creator": "radlens",
                                       "CreationDate": datetime.now(UTC)}) as pdf:
        pages = _Pages(pdf, f"Model: {model}. Narrative written by: {narrative.author_line}.")
        pages.line("radlens report", 0.022, fontsize=16, weight="bold")
        pages.line(STATEMENT, 0.038, fontsize=8, color="#b00020")
        pages.line("Narrative", 0.018, fontsize=11, weight="bold")
        for paragraph in narrative.text.splitlines():
            for line in textwrap.wrap(paragraph, 100) or [""]:
                pages.line(line, 0.0145, fontsize=8.5)
        pages.y -= 0.01
        summary = findings.breast_density
        if density and summary is not None:
            height = 0.022 * (len(density) + 1)
            page = pages.need(0.03 + height + 0.05)
            sides = ", ".join(f"{name} {category}" for name, category in
                              (("right", summary.right), ("left", summary.left)) if category)
            page.text(0.06, pages.y, f"Breast density: study {summary.study}"
                      + (f" ({sides})" if sides else ""), fontsize=11, weight="bold")
            pages.y -= 0.012
            axes = page.add_axes((0.06, pages.y - height, 0.88, height))
            axes.axis("off")
            table = axes.table(cellText=density, loc="upper left", cellLoc="center", colLabels=[
                "image", "side", "view", "category*", "prob.", "attention on tissue",
                "warning"])
            table.auto_set_font_size(False)
            table.set_fontsize(8)
            pages.y -= height + 0.01
            pages.line("* BI-RADS breast composition (A fatty .. D extremely dense): an AI "
                       "suggestion; the study takes the denser breast.", 0.02, fontsize=7.5,
                       style="italic")
        rows = lesion_rows(findings)
        if density and not any(image.predictions for image in findings.images):
            rows = None  # a mammography study: the lesion model read none of it
        if rows is not None:
            _lesion_table(pages, findings, rows)
        reasons = not_analysed_lines(findings)
        if reasons:
            pages.line(f"Not analysed ({len(reasons)})", 0.018, fontsize=11, weight="bold")
            for reason in reasons[:MAX_REASON_LINES]:
                for wrapped in textwrap.wrap(reason, 110):
                    pages.line(wrapped, 0.0135, fontsize=8)
            if len(reasons) > MAX_REASON_LINES:
                pages.line(f"... and {len(reasons) - MAX_REASON_LINES} more (see the SR).",
                           0.0135, fontsize=8)
            pages.y -= 0.01
        for figure in figures:  # the key frames, most confident first
            height = 0.3
            page = pages.need(height)
            for column, (picture, label) in enumerate(
                    zip((figure.image_rgb, figure.overlay_rgb), figure.captions, strict=True)):
                axes = page.add_axes((0.06 + column * 0.45, pages.y - height, 0.42,
                                      height - 0.02))
                axes.imshow(picture)
                axes.set_title(f"{figure.title}: {label}", fontsize=8)
                axes.axis("off")
            pages.y -= height + 0.01
        pages.close()
    return buffer.getvalue()
