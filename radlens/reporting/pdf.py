"""The report people read at a glance, as a PDF: the narrative, each task's table (the lesions
and their measurements, a category per image...), the key images with their outlines beside the
saliency map, the model, who wrote the text, and the not-for-diagnostic-use statement. Drawn
with matplotlib; no identifier is printed in the body. The fonts are embedded as Type 3
subsets with a ToUnicode map, so the text stays text for pdftotext and screen readers: a
one-page report renders in about 0.3 s, where TrueType (Type 42) subsets cost 0.7 s (fontTools
subsetting four fonts per report).
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.backends.backend_pdf import PdfPages  # noqa: E402

from radlens.findings import StudyFindings  # noqa: E402
from radlens.reporting.narrative import Narrative  # noqa: E402

if TYPE_CHECKING:
    from radlens.tasks.base import PdfTable, Task

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


def _table(pages: _Pages, table: PdfTable) -> None:
    """A task's table with its title and footnote, or what it says when it has no row."""
    height = 0.022 * (len(table.rows) + 1) if table.rows else 0.0
    page = pages.need(0.03 + height + 0.03)
    page.text(0.06, pages.y, table.title, fontsize=11, weight="bold")
    if table.note:
        page.text(0.3, pages.y, table.note, fontsize=8, style="italic")
    pages.y -= 0.012
    if table.rows:
        axes = page.add_axes((0.06, pages.y - height, 0.88, height))
        axes.axis("off")
        drawn = axes.table(cellText=table.rows, loc="upper left", cellLoc="center",
                           colLabels=list(table.columns))
        drawn.auto_set_font_size(False)
        drawn.set_fontsize(8)
        pages.y -= height + 0.01
        if table.footnote:
            pages.line(table.footnote, 0.02, fontsize=7.5, style="italic")
    elif table.empty:
        pages.y -= 0.01
        pages.line(table.empty, 0.02, fontsize=9)


def render_report(findings: StudyFindings, narrative: Narrative, figures: Sequence[Figure],
                  tasks: Sequence[Task] = ()) -> bytes:
    """The PDF's bytes: the narrative, each task's table, what was not analysed and why, and
    the key frames; as many pages as that takes."""
    models = [line for task in tasks if (line := task.model_line(findings))]
    if not models and findings.model:
        models = [f"{findings.model.name} {findings.model.version} "
                  f"({findings.model.architecture})"]
    model = "; ".join(models) or "no model"
    buffer = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 3, "font.size": 9}), \
            PdfPages(buffer, metadata={"Title": "radlens report", "Creator": "radlens",
                                       "CreationDate": datetime.now(UTC)}) as pdf:
        pages = _Pages(pdf, f"Model: {model}. Narrative written by: {narrative.author_line}.")
        pages.line("radlens report", 0.022, fontsize=16, weight="bold")
        pages.line(STATEMENT, 0.038, fontsize=8, color="#b00020")
        for used in findings.models_used():
            for part in textwrap.wrap(used.training_statement(), 130):
                pages.line(part, 0.016, fontsize=8)
        pages.line("Narrative", 0.018, fontsize=11, weight="bold")
        for paragraph in narrative.text.splitlines():
            for line in textwrap.wrap(paragraph, 100) or [""]:
                pages.line(line, 0.0145, fontsize=8.5)
        pages.y -= 0.01
        tables = [table for task in tasks if (table := task.pdf_table(findings)) is not None]
        for table in tables:
            _table(pages, table)
        if not tasks:
            pages.y -= 0.01
            pages.line("No image was analysed, so nothing is stated about this study (the "
                       "reasons are below, and in the SR).", 0.02, fontsize=9)
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
