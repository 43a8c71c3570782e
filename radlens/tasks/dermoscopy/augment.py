"""Confounders painted onto training photographs, so that the classifier learns that a
surgeon's ink mark or a hair says nothing about the lesion.

The classifier took ink marks for melanoma more often than anything else in the photographs
(their purple is close to the blue-grey of regression), and hair came next; both occur in
a minority of photographs, too few for a network to learn to look past them. During training
each photograph gets, with probability ``rate``, a surgeon's ink arc or dots around the
lesion, and independently, with the same probability, a few hairs across the frame, drawn
by the phantoms' own painters (``phantoms.paint_ink``, ``phantoms.paint_hair``) on the
photograph as the network sees it. The lesion's ABC(D) features and its class are left as
they were: neither confounder changes the lesion. Photographs are centred on their lesion
(a dermatoscope is placed over it), so the ink goes around the centre at a distance from a
quarter to nearly half of the frame.

torchvision and MONAI have no transform that draws marks of this kind (their random erasing
and noise transforms neither look like ink nor hair), so the drawing is PIL's.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from radlens.tasks.dermoscopy.phantoms import paint_hair, paint_ink


def paint_confounders(generator: torch.Generator, images: torch.Tensor, rate: float
                      ) -> torch.Tensor:
    """``images`` (N, 3, H, W) in 0..1 with ink marks and hairs painted on some (each with
    probability ``rate``); the same generator state gives the same painting."""
    if rate <= 0:
        return images
    draws = torch.rand((len(images), 2), generator=generator)
    chosen = [i for i in range(len(images)) if bool((draws[i] < rate).any())]
    if not chosen:
        return images
    painted = images.clone()
    for index in chosen:
        rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,),
                                                      generator=generator)))
        height, width = images.shape[2:]
        size = min(height, width)
        overlay = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        draw = ImageDraw.Draw(overlay)
        if draws[index, 0] < rate:
            paint_ink(rng, draw, size, height / 2, width / 2, size * rng.uniform(0.18, 0.3))
        if draws[index, 1] < rate:
            paint_hair(rng, draw, size)
        drawn = torch.from_numpy(np.asarray(overlay, dtype=np.float32) / 255.0)
        drawn = drawn.permute(2, 0, 1).to(images.device)
        cover = drawn[3:4]
        painted[index] = images[index] * (1 - cover) + drawn[:3] * cover
    return painted
