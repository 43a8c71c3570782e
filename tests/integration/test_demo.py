"""`make demo` end to end (without waiting for Ctrl-C): Orthanc, OHIF and the agent start, the
phantom study goes in with storescu, and its answer comes back into Orthanc and to the screen."""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request

from tests.helpers import REPO


def test_demo_prints_findings_and_a_working_ohif_url():
    run = subprocess.run([sys.executable, "-m", "radlens.demo", "run", "--exit"], cwd=REPO,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert re.search(r"lesion 1: (benign|malignant), [0-9.]+ x [0-9.]+ mm", out), out
    assert re.search(r"DOC x1, OT x2, SEG x1, SR x1, US x1", out), out  # map + overlay: OT
    url = re.search(r"open in OHIF: (http://127\.0\.0\.1:\d+/viewer\?StudyInstanceUIDs=\S+)",
                    out)
    assert url, out
    # Everything was stopped on the way out: the URL no longer answers.
    try:
        urllib.request.urlopen(url.group(1), timeout=3)
        answered = True
    except OSError:
        answered = False
    assert not answered
