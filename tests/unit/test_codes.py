"""The coded concepts radlens writes: within a scheme, one code value means one thing (a
value reused for two meanings makes an SR say something else than it means)."""

from __future__ import annotations

from pydicom.sr.coding import Code

from radlens.dicom_io import codes
from radlens.reporting.narrative import Category
from radlens.tasks.breast_us.sr import category_code


def _all_codes() -> list[Code]:
    """Every concept any output may carry: the shared ones and every task's."""
    return codes.all_codes() + [category_code(Category(n, "")) for n in range(1, 6)]


def test_every_code_value_has_one_meaning_in_its_scheme():
    meanings: dict[tuple[str, str], set[str]] = {}
    for code in _all_codes():
        meanings.setdefault((code.scheme_designator, code.value), set()).add(code.meaning)
    clashes = {key: names for key, names in meanings.items() if len(names) > 1}
    assert clashes == {}
    private = [key for key in meanings if key[0] == "99RADLENS"]
    assert len(private) >= 40  # the saliency methods, densities and attention shares included
