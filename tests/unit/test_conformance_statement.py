"""The DICOM Conformance Statement in docs/ is what the code says today: regenerated and
compared, and its lists checked against what the listener actually accepts."""

from __future__ import annotations

from pathlib import Path

from radlens.config import Settings
from radlens.conformance_statement import conformance_statement
from radlens.dicom_io.acceptor import build_ae

DOCS = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"


def test_the_statement_in_docs_is_the_code_s_own():
    assert DOCS.read_text() == conformance_statement(), (
        "docs/conformance.md is stale: run `radlens conformance --out docs/conformance.md`")


def test_it_lists_every_context_the_listener_accepts():
    statement = conformance_statement()
    ae = build_ae(Settings().dicom)
    for context in ae.supported_contexts:
        assert f"| {context.abstract_syntax} |" in statement or \
            context.abstract_syntax == "1.2.840.10008.1.1"  # Verification, in the overview
        for syntax in context.transfer_syntax:
            assert f"| {syntax} |" in statement, syntax


def test_every_private_code_says_why_no_standard_one_fits():
    """A concept in radlens's private scheme needs a reason in the statement; the standard
    concepts the outputs use carry none."""
    from radlens.conformance_statement import _codes
    from radlens.dicom_io.codes import private_reasons

    codes = _codes()
    private = {c.value for c in codes if c.scheme_designator == "99RADLENS"}
    reasons = private_reasons()  # the shared concepts' and every task's
    assert private and private <= set(reasons), private - set(reasons)
    statement = conformance_statement()
    assert "| 111047 | DCM | Probability of cancer |  |" in statement
    assert "RADL032" not in statement  # the malignant probability is DICOM's now
    for code in private:
        row = next(line for line in statement.splitlines() if line.startswith(f"| {code} |"))
        assert row.rstrip(" |").split("|")[-1].strip(), row
