"""A patient's T1 volume registered to the MNI152 template with SimpleITK, so that the
Harvard-Oxford label map can be brought onto the patient's own grid.

The transform found maps a point of the patient's volume to the template's (what
SimpleITK's ``Resample`` takes to bring the template's label map onto the patient's grid), in
stages, each starting from the last:

1. the centres of mass aligned (``CenteredTransformInitializer``, moments);
2. a rigid transform (``Euler3DTransform``), then
3. an affine one (``AffineTransform``): heads differ in size and shape,

each with Mattes mutual information (the template is a brain without skull, the patient's
volume a head with it, and their intensities need not match), gradient descent on three
levels of a pyramid (shrink 4, 2, 1; smoothing 2, 1, 0 mm), 10 % of the voxels sampled at
random (seeded: the same volumes give the same transform), the metric evaluated only inside
the template's brain, dilated by 3 mm. Before the metric sees them the patient's intensities
are scaled to its 99th percentile, so that a scanner's units do not matter.

Quality. The template and the patient's volume brought onto the template's grid are
compared inside the template's brain by normalised cross-correlation; a registration below
``MIN_CORRELATION`` is refused (``RegistrationFailed``, with the value), because a label
map placed by a failed registration names structures the tumour is not in. A deformable
stage (B-spline) is not run: on the phantoms, whose heads differ from the template by a
similarity transform, it has nothing to add; on real brains with a mass it would have to
keep the mass from being pulled into the template's healthy anatomy.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from radlens.tasks.brain_mri.atlas import Atlas

log = logging.getLogger(__name__)

MIN_CORRELATION = 0.6
SAMPLING = 0.10
SEED = 7
MASK_DILATION_MM = 3


class RegistrationFailed(RuntimeError):
    """The volume could not be brought onto the template well enough to name structures."""


@dataclass(frozen=True)
class Registration:
    """The transform (patient point → template point), how well it fits, what it cost."""

    transform: object  # SimpleITK.Transform
    correlation: float  # inside the template's brain, after registration
    metric: float  # Mattes mutual information at the end (lower is better)
    seconds: float

    def labels_on(self, atlas: Atlas, volume: object) -> np.ndarray:
        """The atlas's label map on ``volume``'s grid (z, y, x), nearest neighbour."""
        import SimpleITK as sitk

        placed = sitk.Resample(atlas.labels, volume, self.transform, sitk.sitkNearestNeighbor,
                               0, sitk.sitkUInt8)
        return sitk.GetArrayFromImage(placed)


@lru_cache(maxsize=2)
def _template(atlas: Atlas) -> tuple[object, object]:
    """The template scaled as the patient's volume will be, and its brain dilated: the
    moving image and the metric's mask, made once per atlas."""
    import SimpleITK as sitk

    mask = sitk.BinaryDilate(sitk.Cast(atlas.template > 0, sitk.sitkUInt8),
                             [MASK_DILATION_MM] * 3)
    return _normalised(atlas.template), mask


def _normalised(image: object) -> object:
    import SimpleITK as sitk

    values = sitk.GetArrayViewFromImage(image)
    top = float(np.percentile(values, 99)) or 1.0
    return sitk.Cast(image, sitk.sitkFloat32) / top


def _stage(fixed: object, moving: object, mask: object, transform: object, *,
           iterations: int, learning_rate: float) -> tuple[object, float]:
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(SAMPLING, SEED)
    method.SetMetricMovingMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate, minStep=1e-4, numberOfIterations=iterations,
        gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetInitialTransform(transform, inPlace=False)
    found = method.Execute(fixed, moving)
    return found, float(method.GetMetricValue())


def correlation_in_brain(atlas: Atlas, volume: object, transform: object) -> float:
    """Normalised cross-correlation of the template and ``volume`` brought onto its grid,
    inside the template's brain."""
    import SimpleITK as sitk

    template = sitk.GetArrayViewFromImage(atlas.template)
    brain = template > 0
    placed = sitk.GetArrayFromImage(sitk.Resample(
        sitk.Cast(volume, sitk.sitkFloat32), atlas.template, transform.GetInverse(),
        sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    a, b = template[brain].astype(np.float64), placed[brain].astype(np.float64)
    a, b = a - a.mean(), b - b.mean()
    scale = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / scale) if scale else 0.0


def register(volume: object, atlas: Atlas, *, min_correlation: float = MIN_CORRELATION
             ) -> Registration:
    """``volume`` (a SimpleITK image of a T1 head) registered to the template; raises
    RegistrationFailed when the fit is below ``min_correlation``."""
    import SimpleITK as sitk

    started = time.perf_counter()
    fixed = _normalised(volume)
    moving, mask = _template(atlas)
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.MOMENTS)
    rigid, _ = _stage(fixed, moving, mask, initial, iterations=200, learning_rate=2.0)
    affine = sitk.AffineTransform(3)
    rigid_euler = sitk.Euler3DTransform(rigid.GetNthTransform(0)
                                        if isinstance(rigid, sitk.CompositeTransform) else rigid)
    affine.SetMatrix(rigid_euler.GetMatrix())
    affine.SetTranslation(rigid_euler.GetTranslation())
    affine.SetCenter(rigid_euler.GetCenter())
    found, metric = _stage(fixed, moving, mask, affine, iterations=200, learning_rate=1.0)
    if isinstance(found, sitk.CompositeTransform):
        found = found.GetNthTransform(0)
    transform = sitk.AffineTransform(found)
    correlation = correlation_in_brain(atlas, volume, transform)
    seconds = time.perf_counter() - started
    log.info("registered to MNI152", extra={"correlation": round(correlation, 3),
                                            "metric": round(metric, 4),
                                            "seconds": round(seconds, 2)})
    if not np.isfinite(correlation) or correlation < min_correlation:
        raise RegistrationFailed(f"registration to the MNI152 template failed: correlation "
                                 f"{correlation:.2f} inside the brain, under {min_correlation}")
    return Registration(transform, correlation, metric, seconds)
