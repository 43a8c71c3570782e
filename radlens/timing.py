"""Where a job's time goes: wall-clock seconds per pipeline stage, summed over the study.

A reading room feels the time from the last image sent to the results in the PACS; to make it
short one must see which stage costs what. Each job carries one ``StageTimes``; the stages add
to it, and it lands in ``findings.json`` (``timings``) and ``radlens status``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# The stages in the order a job runs them; writers are named by the object they build.
STAGES = ("decode", "inference", "measurement", "saliency", "maps", "findings", "narrative",
          "seg", "sr", "parametric_map", "overlay", "pdf")


@dataclass
class StageTimes:
    seconds: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Add the time spent inside the block to ``name`` (stages may repeat per image)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        """Every stage seen, in job order, and the job's total so far, in seconds."""
        ordered = {name: self.seconds[name] for name in STAGES if name in self.seconds}
        ordered.update({k: v for k, v in self.seconds.items() if k not in ordered})
        ordered["total"] = time.perf_counter() - self.started
        return {name: round(value, 4) for name, value in ordered.items()}
