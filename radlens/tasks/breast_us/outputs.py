"""What the lesion task adds to a study's DICOM answer: SEGs of the lesions, its SR groups, a
saliency Parametric Map and an RGB overlay per explained image, and the PDF's key frames.

Every builder reads the same ``AnalysedImage``s (header, findings, maps), loaded once per study.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from radlens.dicom_io import pixels
from radlens.dicom_io.writers.common import Equipment, SeriesPlan
from radlens.dicom_io.writers.overlay import (
    build_frame_overlays,
    build_parametric_map,
    render_overlay,
)
from radlens.dicom_io.writers.seg import WrittenSegmentation
from radlens.logs import kv
from radlens.tasks.base import ImageOutputs, ImagePlans, OutputContext, SrContent
from radlens.tasks.breast_us import codes as task_codes
from radlens.tasks.breast_us.analysed import AnalysedImage, load_analysed

log = logging.getLogger(__name__)

FIGURES = 2  # key frames shown in the PDF report: those with lesions, most confident first


def analysed_images(context: OutputContext) -> list[AnalysedImage]:
    """Every image with predictions whose header could be read, with its maps (loaded once
    per study and kept in the context)."""
    key = "breast_us.analysed"
    if key not in context.memo:
        context.memo[key] = [
            load_analysed(info, context.sources[info.ref.sop_instance_uid],
                          context.study_results, header=context.headers[info.ref.sop_instance_uid])
            for info in context.findings.images
            if info.predictions and info.ref.sop_instance_uid in context.headers]
    return list(context.memo[key])


def segmentations(context: OutputContext, equipment: Equipment,
                  plan: SeriesPlan) -> list[WrittenSegmentation]:
    from radlens.tasks.breast_us.seg import build_segmentations

    return build_segmentations(analysed_images(context), equipment, plan)


def sr_content(context: OutputContext, segmentations: Sequence[WrittenSegmentation]
               ) -> SrContent:
    """Lesion groups first (OHIF's SR viewport opens on the first group, and only groups with
    image coordinates, the lesions', can be drawn), then each analysed frame's group."""
    import highdicom as hd

    from radlens.tasks.breast_us.sr import image_groups, lesion_group

    images = analysed_images(context)
    if not images:
        return SrContent()
    equipment = Equipment.for_model(context.findings.model)
    algorithm = hd.sr.AlgorithmIdentification(name=equipment.algorithm_name,
                                               version=equipment.algorithm_version)
    segment_of = {sop: seg for seg in segmentations for sop in seg.source_sop_instance_uids}
    groups: list[Any] = []
    number = 0
    for image in images:
        for lesion in image.lesions:
            number += 1
            groups.append(lesion_group(image, lesion, number,
                                       segment_of.get(image.sop_instance_uid), algorithm))
    for image in images:
        groups.extend(image_groups(image, algorithm))
    return SrContent(groups=groups, procedures=[task_codes.ULTRASONOGRAPHY_OF_BREAST],
                     referenced=[image.header for image in images])


def chosen_method(image: AnalysedImage, methods: Sequence[str]) -> str | None:
    """The first configured method that has a map on any frame of the image."""
    for method in methods:
        if any(method in frame.saliency for frame in image.frames.values()):
            return method
    return None


def build_overlays(image: AnalysedImage, method: str, equipment: Equipment, plan: SeriesPlan,
                   first_instance_number: int) -> list[Any]:
    """The overlay of an image, which needs the decoded pixels: one RGB Secondary Capture for a
    single-frame source; for a multi-frame source (a cine loop) one Multi-frame True Color
    Secondary Capture of its analysed frames, in order, that viewers play as a cine. Frames
    without a map (no lesion, nothing to explain) show the image and the lesion outlines."""
    if image.pixels is None:
        raise ValueError("overlays need the decoded source pixels")
    numbers = sorted(image.frames) if image.info.frames > 1 else [
        n for n, f in sorted(image.frames.items()) if method in f.saliency]
    if not numbers:
        return []
    rendered = [render_overlay(image.pixels[n], image.frames[n].saliency.get(
        method, np.zeros((image.info.rows, image.info.columns), np.float32)), image.mask(n))
        for n in numbers]
    if image.info.frames > 1:
        comments = (f"{method} saliency over {len(numbers)} frame(s) of "
                    f"{image.sop_instance_uid}, lesions outlined in green. Saliency "
                    "shows what the model attends to, not whether it is right.")
    else:
        comments = (f"{method} saliency over {image.sop_instance_uid}, lesions "
                    "outlined in green. Saliency shows what the model attends to, "
                    "not whether it is right.")
    return [build_frame_overlays(image.header, image.info, rendered, numbers, equipment, plan,
                                 first_instance_number, comments=comments)]


def saliency_planes(image: AnalysedImage, method: str) -> np.ndarray:
    """The method's map on every frame of the source (0 where none was computed)."""
    planes = np.zeros((image.info.frames, image.info.rows, image.info.columns), np.float32)
    for number, frame in image.frames.items():
        if method in frame.saliency:
            planes[number] = frame.saliency[method]
    return planes


def _failure(what: str, context: OutputContext, exc: Exception) -> str:
    log.error("DICOM output not written", exc_info=exc,
              extra=kv(study=context.findings.study_instance_uid, output=what))
    return f"The {what} could not be written: {type(exc).__name__}: {exc}"[:1000]


def image_outputs(context: OutputContext, equipment: Equipment,
                  plans: ImagePlans) -> ImageOutputs:
    """Parametric Map and RGB overlay of every image with a saliency map, and the PDF's
    figures (the key frames: with a lesion, most confident first), decoding each source at
    most once."""
    settings, times = context.settings, context.times
    out = ImageOutputs()
    for number, image in enumerate(analysed_images(context), start=1):
        method = chosen_method(image, context.saliency_methods)
        if method is not None and settings.parametric_map:
            with times.stage("parametric_map"):
                try:
                    out.parametric_maps.append(build_parametric_map(
                        image.header, image.info, saliency_planes(image, method), method,
                        equipment, plans.parametric_map,
                        plans.first_parametric_map + len(out.parametric_maps),
                        region=task_codes.BREAST))
                except Exception as exc:
                    out.failures.append(_failure(
                        f"saliency Parametric Map of {image.sop_instance_uid}", context, exc))
        overlay = method is not None and settings.overlay
        figure = settings.pdf and bool(image.lesions)
        if not (overlay or figure):
            continue
        with times.stage("overlay"):  # the decode it needs included
            try:
                frames = pixels.decode_file(context.sources[image.sop_instance_uid]).pixels
            except Exception as exc:  # an undecodable source
                if overlay:
                    out.failures.append(_failure(
                        f"saliency overlay of {image.sop_instance_uid}", context, exc))
                continue
            if overlay:
                assert method is not None
                try:
                    with_pixels = dataclasses.replace(image, pixels=frames)
                    out.overlays += build_overlays(with_pixels, method, equipment, plans.overlay,
                                                   plans.first_overlay + len(out.overlays))
                except Exception as exc:  # a refused header
                    out.failures.append(_failure(
                        f"saliency overlay of {image.sop_instance_uid}", context, exc))
        if figure:
            with times.stage("pdf"):
                out.figures += _figures(image, number, frames, method, FIGURES)
            out.figures = sorted(out.figures, key=lambda f: -f.confidence)[:FIGURES]
    return out


def _figures(image: AnalysedImage, number: int, frames: np.ndarray, method: str | None,
             limit: int) -> list[Any]:
    """The image's most confident frames with a lesion (at most ``limit``): outlined, and
    beside it the saliency overlay."""
    from radlens.reporting.pdf import Figure

    def confidence(frame: int) -> float:
        return max(lesion.probability for lesion in image.frames[frame].prediction.lesions)

    figures = []
    key_frames = sorted((f for f, a in image.frames.items() if a.prediction.lesions),
                        key=lambda f: (-confidence(f), f))[:limit]
    for frame in key_frames:
        mask = image.mask(frame)
        zero = np.zeros(mask.shape, np.float32)
        saliency = image.frames[frame].saliency.get(method, zero) if method else zero
        title = f"image {number}" + (f", frame {frame + 1}" if image.info.frames > 1 else "")
        figures.append(Figure(title, render_overlay(frames[frame], zero, mask),
                              render_overlay(frames[frame], saliency, mask),
                              confidence=confidence(frame)))
    return figures


def overlay_pngs(context: OutputContext, limit: int) -> list[bytes]:
    """The saliency overlays as PNG, for a vision-capable LLM the user enabled."""
    from PIL import Image

    pngs: list[bytes] = []
    for info in context.findings.images:
        if not info.predictions or info.ref.sop_instance_uid not in context.sources:
            continue
        image = load_analysed(info, context.sources[info.ref.sop_instance_uid],
                              context.study_results)
        method = chosen_method(image, context.saliency_methods)
        if method is None:
            continue
        decoded = pixels.decode_file(context.sources[image.sop_instance_uid])
        for number, frame in sorted(image.frames.items()):
            if method in frame.saliency and len(pngs) < limit:
                rgb = render_overlay(decoded.pixels[number], frame.saliency[method],
                                     image.mask(number))
                buffer = io.BytesIO()
                Image.fromarray(rgb).save(buffer, format="PNG")
                pngs.append(buffer.getvalue())
    return pngs
