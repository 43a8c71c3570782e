"""Which layer Grad-CAM should explain on the shipped UNet: its last encoder stage, or the
decoder block at half resolution that radlens uses (``cam_layer: auto``).

For held-out phantoms (seeds 123 and 321, never trained on) whose lesion covers at least
``--min-share`` of the frame, prints per layer the Dice of the map thresholded at the adaptive
percentile against the true lesion mask, and the share of the map's mass inside it (median,
lowest, highest). The README and the network's docstring quote this table.

    .venv/bin/python benchmarks/cam_layer.py [--per-seed 40] [--min-share 0.03]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from radlens.tasks.breast_us.infer import Segmenter  # noqa: E402
from radlens.tasks.breast_us.phantoms import make_phantom  # noqa: E402
from radlens.tasks.breast_us.saliency import SaliencyExplainer, agreement  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-seed", type=int, default=40, help="phantoms drawn per seed")
    parser.add_argument("--min-share", type=float, default=0.03,
                        help="smallest lesion share of the frame kept")
    options = parser.parse_args()

    segmenter = Segmenter(device="cpu", batch_size=2)
    explainers = {"last encoder stage": SaliencyExplainer(segmenter, cam_layer="encoder"),
                  "half-resolution decoder block (auto)": SaliencyExplainer(segmenter)}
    cases = [make_phantom(seed, index) for seed in (123, 321)
             for index in range(options.per_seed)]
    cases = [case for case in cases if (case.mask > 0).mean() >= options.min_share]
    scores: dict[str, list[tuple[float, float]]] = {name: [] for name in explainers}
    for case in cases:
        for name, explainer in explainers.items():
            (saliency,) = explainer.explain(case.image.astype(np.float32), ["gradcam"])
            found = agreement(saliency.map, case.mask > 0)
            scores[name].append((found.dice, found.mass_inside))
    print(f"\nGrad-CAM on the shipped UNet, {len(cases)} held-out phantoms (seeds 123 and 321) "
          f"whose lesion covers at least {options.min_share:.0%} of the frame\n")
    print("| layer | Dice, median (lowest-highest) | mass inside, median (lowest-highest) |")
    print("|---|---:|---:|")
    for name, values in scores.items():
        dice = np.array([v[0] for v in values])
        mass = np.array([v[1] for v in values])
        print(f"| {name} | {np.median(dice):.2f} ({dice.min():.2f}-{dice.max():.2f}) | "
              f"{np.median(mass):.2f} ({mass.min():.2f}-{mass.max():.2f}) |")


if __name__ == "__main__":
    main()
