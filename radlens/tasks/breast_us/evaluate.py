"""Evaluation: a model on a labelled dataset, or several architectures trained and evaluated
under identical settings, side by side (``radlens evaluate``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from radlens.datasets.segmentation import Layout
from radlens.models.calibration import as_trained_and_stated
from radlens.models.metrics import PIXEL_METRICS, evaluation_report, markdown_table, predict
from radlens.models.ood import summary
from radlens.tasks.breast_us.datasets import SegmentationDataset, load_cases
from radlens.tasks.breast_us.infer import Segmenter
from radlens.tasks.breast_us.train import TrainSettings, run_training


def evaluate_folder(data: Path, model: str | Path, out: Path, *, device: str = "auto",
                    seed: int = 0, batch_size: int = 8,
                    unlike: dict[str, list[np.ndarray]] | None = None,
                    layout: Layout | None = None) -> dict[str, Any]:
    """Evaluate a weights folder on every case of ``data``; writes report.json and report.md.
    With an OOD detector, the score distribution of ``data`` and of each ``unlike`` source
    (frames the model should abstain on) is reported beside the metrics."""
    segmenter = Segmenter(model, device=device, batch_size=batch_size)
    cases = load_cases(data, layout)
    dataset = SegmentationDataset(cases, size=segmenter.input_size[0],
                                  policy=segmenter.preprocessing)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    predictions = predict(segmenter.model, loader, segmenter.device)
    report = evaluation_report(predictions, seed)
    report["model"] = {"name": segmenter.name, "version": segmenter.version,
                       "folder": str(segmenter.folder)}
    report["data"] = str(data)
    table = markdown_table(report, f"{segmenter.name} {segmenter.version} on {data}")
    out.mkdir(parents=True, exist_ok=True)
    report["calibration"] = calibration_report(predictions.image_probabilities,
                                               predictions.labels, segmenter.temperature, out)
    table += calibration_table(report["calibration"])
    if segmenter.ood is not None:
        # The evaluation pass's latents are the agent's: the dataset is prepared under the
        # model's own preprocessing, so the data need not go through the network again.
        report["ood"] = ood_report(segmenter, predictions.latents, unlike or {}, str(data))
        table += ood_table(report["ood"])
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(table)
    return report


def calibration_report(probabilities: np.ndarray, labels: np.ndarray, temperature: float,
                       out: Path) -> dict[str, Any]:
    """ECE and Brier score of the image probabilities as the network gives them and as the
    agent states them (after the card's temperature), and a reliability diagram."""
    trained, stated = as_trained_and_stated(probabilities, labels, temperature,
                                            out / "reliability.png", "Image probabilities")
    return {"temperature": temperature, "as_trained": trained.as_dict(),
            "stated": stated.as_dict() if stated else None, "diagram": "reliability.png"}


def calibration_table(calibration: dict[str, Any]) -> str:
    trained, stated = calibration["as_trained"], calibration["stated"]
    line = (f"\n## Calibration of the image probabilities\n\nAs trained: ECE "
            f"{trained['ece']:.3f}, Brier {trained['brier']:.3f} over {trained['images']} "
            "images")
    if stated:
        line += (f"; as the agent states them (temperature {calibration['temperature']:.2f}): "
                 f"ECE {stated['ece']:.3f}, Brier {stated['brier']:.3f}")
    else:
        line += "; the model's card states no calibration, so the agent states these"
    return line + f". Reliability diagram: `{calibration['diagram']}`.\n"


def ood_report(segmenter: Segmenter, latents: np.ndarray,
               unlike: dict[str, list[np.ndarray]], name: str) -> dict[str, Any]:
    """OOD score distributions: of the evaluated data (its pooled ``latents``) and of each
    ``unlike`` source's frames."""
    detector = segmenter.ood
    assert detector is not None
    distributions = {f"{name} (should pass)": summary(detector.score(latents),
                                                      detector.threshold)}
    for source, frames in unlike.items():
        distributions[f"{source} (should abstain)"] = summary(
            detector.score(segmenter.latents(frames)), detector.threshold)
    return {"threshold": detector.threshold, "distributions": distributions}


def ood_table(ood: dict[str, Any]) -> str:
    lines = ["", f"## Out-of-distribution score (threshold {ood['threshold']:.2f}; above it a "
             "frame abstains)", "",
             "| images | frames | abstain rate | min | 5 % | median | 95 % | max |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d in ood["distributions"].items():
        lines.append(f"| {name} | {d['n']} | {d['abstain_rate']:.3f} | {d['min']:.1f} | "
                     f"{d['p5']:.1f} | {d['median']:.1f} | {d['p95']:.1f} | {d['max']:.1f} |")
    return "\n".join(lines) + "\n"


def compare_architectures(data: Path, architectures: list[str], out: Path, *, epochs: int,
                          folds: int = 0, device: str = "auto", seed: int = 0) -> dict[str, Any]:
    """Train each architecture with the same settings, split and seed; compare their validation
    results (mean over folds) in one table."""
    if not architectures:
        raise ValueError("--compare needs at least one architecture")
    results: dict[str, Any] = {}
    for arch in architectures:
        settings = TrainSettings(arch=arch, epochs=epochs, folds=folds, device=device, seed=seed)
        metrics = run_training(data, settings, out / arch,
                               command=f"radlens evaluate --compare {','.join(architectures)}")
        card = json.loads((out / arch / "card.json").read_text())
        results[arch] = {"parameters": card["parameters"], "summary": metrics["summary"],
                         "test": metrics.get("test")}
    report = {"data": str(data), "epochs": epochs, "folds": folds, "seed": seed,
              "architectures": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(comparison_table(report))
    return report


def comparison_table(report: dict[str, Any]) -> str:
    def cell(spread: dict[str, float | None]) -> str:
        if spread["mean"] is None:
            return "n/a"
        text = f"{100 * spread['mean']:.2f}"
        return text + (f" ± {100 * spread['std']:.2f}" if report["folds"] > 1 else "")

    def test_cell(test: dict[str, Any] | None) -> str:
        if not test or test["segmentation"]["lesion"]["dice"] is None:
            return "n/a"
        bounds = (test.get("intervals") or {}).get("lesion_dice")
        text = f"{100 * test['segmentation']['lesion']['dice']:.2f}"
        return text + (f" ({100 * bounds[0]:.1f}-{100 * bounds[1]:.1f})" if bounds else "")

    header = ("| architecture | parameters | " + " | ".join(
        m.replace("_", " ") for m in PIXEL_METRICS)
        + " | lesion Dice | image accuracy | latent-probe accuracy | test lesion Dice (95 % CI) "
          "|")
    lines = [f"## Architectures compared on {report['data']} ({report['epochs']} epochs max, "
             f"{max(report['folds'], 1)} fold(s), seed {report['seed']}); validation averages "
             "over the lesion classes, percent; the last column on the held-out test set, "
             "where nothing was chosen", "", header,
             "|---" + "|---:" * (len(PIXEL_METRICS) + 5) + "|"]
    for arch, result in report["architectures"].items():
        summary = result["summary"]
        lines.append(f"| {arch} | {result['parameters'] / 1e6:.2f} M | " + " | ".join(
            cell(summary["average"][m]) for m in PIXEL_METRICS) + f" | "
            f"{cell(summary['lesion_dice'])} | {cell(summary['from_segmentation']['accuracy'])} | "
            f"{cell(summary['linear_probe_on_latents']['accuracy'])} | "
            f"{test_cell(result.get('test'))} |")
    return "\n".join(lines) + "\n"
