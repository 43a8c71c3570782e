"""The check that an image is a dermoscopic photograph at all: every phantom passes, on every
skin type; every colour image of pydicom's and pydicom-data's corpora (colour bars, Doppler
and greyscale ultrasound stored as RGB, text) is refused with its reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_files

from radlens.tasks.dermoscopy.phantoms import make_case
from radlens.tasks.dermoscopy.scope import not_a_dermoscopic_photograph


def test_every_phantom_is_a_dermoscopic_photograph_on_every_skin_type():
    cases = [make_case(9, i, size=128) for i in range(60)]
    assert {c.fitzpatrick for c in cases} >= {1, 2, 3, 4, 5}
    assert [c.case_id for c in cases if not_a_dermoscopic_photograph(c.image)] == []


def _corpus_colour_images() -> list[tuple[str, np.ndarray]]:
    images = []
    for path in sorted({Path(p) for p in get_testdata_files() if Path(p).is_file()}):
        try:
            ds = pydicom.dcmread(path)
            if int(getattr(ds, "SamplesPerPixel", 1)) != 3:
                continue
            pixels = ds.pixel_array
        except Exception:  # not an instance, or pixels pydicom cannot decode: not this test's
            continue
        first = pixels[0] if pixels.ndim == 4 else pixels
        if first.dtype == np.uint8 and min(first.shape[:2]) >= 8:
            images.append((path.name, first))
    return images


def test_the_corpus_colour_images_are_refused_with_a_reason():
    images = _corpus_colour_images()
    assert len(images) >= 30  # colour bars, ultrasound, text, JPEG and RLE variants
    for name, image in images:
        reason = not_a_dermoscopic_photograph(image)
        assert reason is not None, name
        assert any(word in reason for word in ("no colour", "not skin", "mostly dark")), reason


@pytest.mark.parametrize("image", [np.zeros((64, 64), np.uint8),
                                   np.full((64, 64, 3), 128, np.uint8)])
def test_grey_images_are_refused(image):
    assert not_a_dermoscopic_photograph(image) is not None
