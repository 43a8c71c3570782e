"""The cohort report of latent probing (docs/method.md): the cluster tables of ``radlens
cohort`` turned into one structured prompt, answered by the local LLM (with the t-SNE pictures
when the model takes images and the user enabled it), grounded like the study narrative, and
written as Markdown next to the tables. A deterministic summary stands in whenever the LLM is
off, slow, wrong or absent."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from radlens.config import LlmSettings
from radlens.reporting import grounding
from radlens.reporting.narrative import TEMPLATE_AUTHOR, Narrative

log = logging.getLogger(__name__)

REPORT_FILE = "cohort_report.md"
SYSTEM = (
    "You are a careful imaging research assistant. You interpret cluster tables of a latent "
    "space analysis of the images a model read. Every number you write must be one of the "
    "tables', rounded as given; you name only the clusters and classes they hold. Nothing you "
    "write is a diagnosis. Answer with JSON matching the schema you are given.")
TASKS = (
    "From the cohort JSON below: (1) summary: a readable clinical summary of the cohort; (2) "
    "latent_picture: what the latent space and the clustering show about the data (use the "
    "clustering scores and the linear probe); (3) cluster_comparison: compare the clusters by "
    "their measurements (size, compactness, edge sharpness, border irregularity, asymmetry, "
    "class mix); (4) interpretation: a BI-RADS-style interpretation per cluster, worded as a "
    "suggestion (normal maps to 1, benign to 2-3, malignant to 4-5, a mixed benign/malignant "
    "cluster to 3/4a needing follow-up); (5) subgroups: whether the clusters follow the known "
    "classes or reveal a new subgroup.")


class CohortNarrative(BaseModel):
    summary: str = Field(description="a readable clinical summary of the cohort")
    latent_picture: str = Field(description="what the latent space and clusters show")
    cluster_comparison: str = Field(description="the clusters compared by measurements")
    interpretation: str = Field(description="BI-RADS-style interpretation per cluster")
    subgroups: str = Field(description="known classes or a new subgroup")

    def text(self) -> str:
        return "\n\n".join([
            f"**Summary.** {self.summary.strip()}",
            f"**Latent space.** {self.latent_picture.strip()}",
            f"**Clusters compared.** {self.cluster_comparison.strip()}",
            f"**Interpretation (AI suggestion).** {self.interpretation.strip()}",
            f"**Subgroups.** {self.subgroups.strip()}"])


def _row(row: dict[str, Any]) -> dict[str, Any]:
    def r(value: Any, digits: int) -> Any:
        return None if value is None else round(float(value), digits)

    return {"group": row["group"], "samples": row["samples"], "lesions": row.get("lesions"),
            "area_mm2": r(row.get("area_mm2"), 1), "compactness": r(row.get("compactness"), 2),
            "edge_sharpness": r(row.get("edge_sharpness"), 1),
            "border_irregularity": r(row.get("border_irregularity"), 2),
            "asymmetry": r(row.get("asymmetry"), 2),
            "class_percent": {k: round(v) for k, v in (row.get("class_percent") or {}).items()}}


def cohort_facts(report: dict[str, Any]) -> dict[str, Any]:
    """What the LLM may know: the tables, rounded; no paths, no identifiers."""
    chosen = next(s for s in report["clustering"] if s["algorithm"] == report["best"])
    probe = report.get("linear_probe") or {}
    return {
        "images": report["images"], "grouping": report.get("grouping", "ground truth"),
        "best_clustering": {"algorithm": chosen["algorithm"], "clusters": chosen["clusters"],
                            "noise": chosen["noise"],
                            "silhouette": round(chosen["silhouette"], 2),
                            "davies_bouldin": round(chosen["davies_bouldin"], 2)},
        # None when the probe could not run (a single class among the samples)
        "linear_probe_accuracy_percent": (None if probe.get("accuracy") is None
                                          else round(100 * probe["accuracy"])),
        "linear_probe_auc": (None if probe.get("auc_ovr") is None
                             else round(probe["auc_ovr"], 2)),
        "per_class": [_row(row) for row in report["per_class"]],
        "per_cluster": [_row(row) for row in report["per_cluster"]],
    }


def _allowed(facts: dict[str, Any]) -> set[float]:
    values = {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, int | float) and not isinstance(node, bool):
            for digits in (0, 1, 2):
                values.add(round(float(node), digits))
        elif isinstance(node, str):
            for number in re.findall(r"\d+(?:\.\d+)?", node):
                values.add(float(number))

    walk(facts)
    return values


def check(text: str, facts: dict[str, Any]) -> list[str]:
    violations = grounding.number_violations(text, _allowed(facts))
    clusters = {row["group"] for row in facts["per_cluster"]}
    for match in re.finditer(r"\bcluster\s+(\d+)\b", text, re.IGNORECASE):
        if f"cluster {match.group(1)}" not in clusters:
            violations.append(f"cluster {match.group(1)} does not exist")
    violations += grounding.location_and_identifier_violations(text)
    return list(dict.fromkeys(violations))


def template_cohort(facts: dict[str, Any]) -> str:
    best = facts["best_clustering"]
    probe = facts["linear_probe_accuracy_percent"]
    lines = [f"**Summary.** {facts['images']} images; the best of nine clusterings is "
             f"{best['algorithm']} with {best['clusters']} cluster(s) (silhouette "
             f"{best['silhouette']:.2f}). "
             + (f"A linear probe on the latents reaches {probe}% accuracy." if probe is not None
                else "A linear probe could not run: the samples hold a single class.")]
    for row in facts["per_cluster"]:
        mix = ", ".join(f"{k} {v}%" for k, v in row["class_percent"].items())
        size = f", mean area {row['area_mm2']:.1f} mm²" if row["area_mm2"] is not None else ""
        shape = (f", compactness {row['compactness']:.2f}, edge sharpness "
                 f"{row['edge_sharpness']:.1f}" if row["compactness"] is not None else "")
        lines.append(f"- {row['group']}: {row['samples']} images ({mix}){size}{shape}.")
    lines.append("**Interpretation (AI suggestion).** Normal maps to BI-RADS-style 1, benign to "
                 "2-3, malignant to 4-5; a mixed benign/malignant cluster suggests 3/4a and "
                 "follow-up. Not for diagnostic use.")
    return "\n\n".join(lines)


def write_cohort_report(out: Path, report: dict[str, Any], settings: LlmSettings, *,
                        vision_capable: bool = False) -> Narrative:
    """``cohort_report.md`` next to the tables: the narrative, who wrote it, the tables."""
    from radlens.reporting.ollama import grounded_text

    facts = cohort_facts(report)
    narrative = Narrative(text=template_cohort(facts), author=TEMPLATE_AUTHOR)
    if settings.provider == "ollama":
        images = None
        if settings.vision and vision_capable:
            images = [(out / name).read_bytes() for name in report.get("pictures", [])
                      if (out / name).is_file()]

        def messages(violations: list[str] | None) -> list[dict[str, Any]]:
            user = f"{TASKS}\n\nCohort JSON:\n{json.dumps(facts, indent=1)}"
            chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
            if violations:
                chat.append({"role": "user", "content": "Your previous answer was rejected:\n- "
                             + "\n- ".join(violations) + "\nWrite it again from the tables."})
            return chat

        text, reason, grounded = grounded_text(
            settings, CohortNarrative, messages, lambda answer: check(answer, facts),
            subject=f"cohort {out}", images=images)
        if text is not None:
            narrative = Narrative(text=text, author=settings.model, grounded=True)
        else:
            narrative = Narrative(text=narrative.text, author=TEMPLATE_AUTHOR,
                                  grounded=grounded, note=f"template used because {reason}")
    tables = (out / "cohort.md").read_text() if (out / "cohort.md").is_file() else ""
    pictures = "\n".join(f"![{name}]({name})" for name in report.get("pictures", []))
    (out / REPORT_FILE).write_text(
        "# Cohort report\n\n*Research use only: not for diagnostic use.*\n\n"
        f"{narrative.text}\n\n*Written by: {narrative.author_line}.*\n\n{pictures}\n\n{tables}")
    log.info("cohort report written", extra={"path": str(out / REPORT_FILE),
                                             "author": narrative.author})
    return narrative
