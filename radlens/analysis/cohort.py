"""Latent probing over a cohort (docs/method.md): encoder latents clustered nine ways, scored,
drawn with t-SNE, and described by the lesions' measurements per class and per cluster.

Latents are the deepest encoder map, global-average pooled, one per image, standardised before
clustering. Lesion attributes are measured on the reference masks of a labelled dataset, so the
tables describe the data, not the model's segmentation.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.cluster import (
    DBSCAN,
    OPTICS,
    AffinityPropagation,
    AgglomerativeClustering,
    Birch,
    KMeans,
    MeanShift,
    SpectralClustering,
)
from sklearn.exceptions import ConvergenceWarning
from sklearn.manifold import TSNE
from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

LABELS = ("normal", "benign", "malignant")
ALGORITHMS = ("kmeans", "agglomerative", "spectral", "gmm", "birch", "dbscan", "optics",
              "meanshift", "affinity_propagation")


@dataclass(frozen=True)
class ClusteringScore:
    algorithm: str
    clusters: int
    noise: int
    silhouette: float | None  # higher is better
    calinski_harabasz: float | None  # higher is better
    davies_bouldin: float | None  # lower is better


def _dbscan_eps(latents: np.ndarray, min_samples: int) -> float:
    """A data-driven eps: the median distance to the ``min_samples``-th neighbour."""
    neighbours = NearestNeighbors(n_neighbors=min(min_samples, len(latents))).fit(latents)
    distances, _ = neighbours.kneighbors(latents)
    return float(np.median(distances[:, -1]))


def cluster(latents: np.ndarray, algorithm: str, *, n_clusters: int = 3, seed: int = 0,
            dbscan_eps: float | None = None, min_samples: int = 5) -> np.ndarray:
    """Labels from one algorithm (-1 = noise for DBSCAN and OPTICS)."""
    n = len(latents)
    if algorithm == "kmeans":
        model: Any = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    elif algorithm == "agglomerative":
        model = AgglomerativeClustering(n_clusters=n_clusters)
    elif algorithm == "spectral":
        model = SpectralClustering(n_clusters=n_clusters, random_state=seed,
                                   affinity="nearest_neighbors",
                                   n_neighbors=max(2, min(10, n - 1)))
    elif algorithm == "gmm":
        return GaussianMixture(n_components=n_clusters, random_state=seed,
                               covariance_type="diag").fit(latents).predict(latents)
    elif algorithm == "birch":
        model = Birch(n_clusters=n_clusters)
    elif algorithm == "dbscan":
        eps = dbscan_eps if dbscan_eps is not None else _dbscan_eps(latents, min_samples)
        model = DBSCAN(eps=eps, min_samples=min_samples)
    elif algorithm == "optics":
        model = OPTICS(min_samples=min(min_samples, n))
    elif algorithm == "meanshift":
        model = MeanShift()
    elif algorithm == "affinity_propagation":
        model = AffinityPropagation(random_state=seed, max_iter=500)
    else:
        raise ValueError(f"unknown clustering algorithm {algorithm!r} (known: {ALGORITHMS})")
    return np.asarray(model.fit_predict(latents))


def score(latents: np.ndarray, labels: np.ndarray, algorithm: str) -> ClusteringScore:
    """Silhouette, Calinski-Harabasz and Davies-Bouldin over every point, noise (-1) scored as
    a group of its own, as in the published comparison (where DBSCAN and OPTICS come out
    negative); None when there are fewer than two groups or a group per point."""
    clusters = len(set(labels[labels >= 0].tolist()))
    noise = int((labels < 0).sum())
    groups = len(set(labels.tolist()))
    if groups < 2 or groups >= len(labels):
        return ClusteringScore(algorithm, clusters, noise, None, None, None)
    return ClusteringScore(algorithm, clusters, noise, float(silhouette_score(latents, labels)),
                           float(calinski_harabasz_score(latents, labels)),
                           float(davies_bouldin_score(latents, labels)))


def run_clusterings(latents: np.ndarray, *, n_clusters: int = 3, seed: int = 0,
                    on_done: Callable[[str], None] | None = None
                    ) -> tuple[list[ClusteringScore], dict[str, np.ndarray]]:
    scaled = StandardScaler().fit_transform(latents)
    scores, labelings = [], {}
    for algorithm in ALGORITHMS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = cluster(scaled, algorithm, n_clusters=n_clusters, seed=seed)
        labelings[algorithm] = labels
        scores.append(score(scaled, labels, algorithm))
        if on_done is not None:
            on_done(algorithm)
    return scores, labelings


def best(scores: list[ClusteringScore]) -> ClusteringScore:
    """The highest silhouette among clusterings that found two or more clusters."""
    valid = [s for s in scores if s.silhouette is not None and s.clusters >= 2]
    if not valid:
        raise ValueError("no clustering found two or more clusters")
    return max(valid, key=lambda s: s.silhouette)  # type: ignore[arg-type, return-value]


def attribute_table(groups: dict[str, list[int]], attributes: list[dict[str, Any]],
                    labels: np.ndarray) -> list[dict[str, Any]]:
    """Per group: samples, mean lesion size (px, mm2), compactness, edge sharpness, centroid,
    and the class distribution of its members (percent)."""
    rows = []
    for name, members in groups.items():
        lesions = [attributes[i] for i in members if attributes[i] is not None]
        row: dict[str, Any] = {"group": name, "samples": len(members), "lesions": len(lesions)}
        for field in ("area_px", "area_mm2", "compactness", "edge_sharpness", "centroid_x",
                      "centroid_y", "border_irregularity", "asymmetry"):
            values = [lesion[field] for lesion in lesions if lesion.get(field) is not None]
            row[field] = float(np.mean(values)) if values else None
        counts = np.bincount(labels[members], minlength=3) if members else np.zeros(3)
        row["class_percent"] = {k: float(100 * counts[i] / max(len(members), 1))
                                for i, k in enumerate(LABELS)}
        rows.append(row)
    return rows


def tsne_pictures(latents: np.ndarray, labels: np.ndarray, clusters: np.ndarray,
                  algorithm: str, out: Path, seed: int = 0) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    perplexity = float(max(2, min(30, (len(latents) - 1) / 3)))
    embedded = TSNE(n_components=2, perplexity=perplexity, random_state=seed,
                    init="pca").fit_transform(StandardScaler().fit_transform(latents))
    paths = (out / "tsne_classes.png", out / "tsne_clusters.png")
    for path, values, names, title in (
            (paths[0], labels, list(LABELS), "t-SNE of encoder latents, by class"),
            (paths[1], clusters, None, f"t-SNE of encoder latents, by {algorithm} cluster")):
        figure, axes = plt.subplots(figsize=(6, 5))
        for value in sorted(set(values.tolist())):
            chosen = values == value
            name = (names[value] if names else ("noise" if value < 0 else f"cluster {value}"))
            axes.scatter(embedded[chosen, 0], embedded[chosen, 1], s=12, label=name, alpha=0.8)
        axes.set_title(title)
        axes.legend(loc="best", fontsize=8)
        axes.set_xticks([])
        axes.set_yticks([])
        figure.tight_layout()
        figure.savefig(path, dpi=100)
        plt.close(figure)
    return paths


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_report(report: dict[str, Any]) -> str:
    lines = [f"# Cohort: {report['images']} images from {report['data']}", "",
             f"Model: {report['model']}. Latents: deepest encoder map, average-pooled "
             f"({report['latent_size']} values), standardised. Classes: "
             f"{report.get('grouping', 'reference class')}.", "",
             "## Clustering (silhouette and Calinski-Harabasz: higher is better; "
             "Davies-Bouldin: lower is better)", "",
             "| algorithm | clusters | noise | silhouette | Calinski-Harabasz | Davies-Bouldin |",
             "|---|---:|---:|---:|---:|---:|"]
    for s in report["clustering"]:
        lines.append(f"| {s['algorithm']} | {s['clusters']} | {s['noise']} | "
                     f"{_fmt(s['silhouette'], 4)} | {_fmt(s['calinski_harabasz'])} | "
                     f"{_fmt(s['davies_bouldin'], 4)} |")
    lines += ["", f"Best by silhouette: **{report['best']}**. Linear probe on the latents "
              f"(cross-validated logistic regression): accuracy "
              f"{_fmt(report['linear_probe']['accuracy'], 3)}, one-vs-rest AUC "
              f"{_fmt(report['linear_probe']['auc_ovr'], 3)}.", ""]
    for title, rows in (("Per class", report["per_class"]),
                        (f"Per cluster ({report['best']})", report["per_cluster"])):
        lines += [f"## {title}", "",
                  "| group | samples | lesions | size (px) | size (mm²) | compactness | "
                  "sharpness | centroid x | centroid y | normal % | benign % | malignant % |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in rows:
            pct = row["class_percent"]
            lines.append(
                f"| {row['group']} | {row['samples']} | {row['lesions']} | "
                f"{_fmt(row['area_px'], 0)} | {_fmt(row['area_mm2'], 1)} | "
                f"{_fmt(row['compactness'])} | {_fmt(row['edge_sharpness'], 1)} | "
                f"{_fmt(row['centroid_x'])} | {_fmt(row['centroid_y'])} | "
                f"{pct['normal']:.0f} | {pct['benign']:.0f} | {pct['malignant']:.0f} |")
        lines.append("")
    lines += ["![t-SNE by class](tsne_classes.png) ![t-SNE by cluster](tsne_clusters.png)", ""]
    return "\n".join(lines)


def analyse_dataset(data: Path, out: Path, *, model: str = "default", device: str = "auto",
                    seed: int = 0, on_progress: Callable[[str, int, int], None] | None = None
                    ) -> dict[str, Any]:
    """Latents from the model, attributes from the reference masks, nine clusterings, tables,
    pictures; writes ``cohort.json`` and ``cohort.md`` into ``out``."""
    from radlens.analysis.lesions import measure_frame
    from radlens.datasets.segmentation import read_grey, read_mask
    from radlens.tasks.breast_us.datasets import LABELS as DATA_LABELS
    from radlens.tasks.breast_us.datasets import LESION_MASKS, load_cases
    from radlens.tasks.breast_us.infer import Segmenter

    cases = load_cases(data)
    segmenter = Segmenter(model, device=device)
    latents, labels, attributes = [], [], []
    for index, case in enumerate(cases):
        image = read_grey(case.image_path).astype(np.uint8)
        classes = read_mask(case, LESION_MASKS).astype(np.uint8)
        (prediction,) = segmenter.predict([image])
        latents.append(prediction.latent)
        labels.append(DATA_LABELS.index(case.label))
        lesions = measure_frame(image.astype(np.float64), classes, None,
                                spacing_mm=case.spacing_mm)
        attributes.append(_attributes(lesions[0].model_dump(mode="json")) if lesions else None)
        if on_progress is not None:
            on_progress("images", index + 1, len(cases))
    return summarise_cohort(np.stack(latents), np.asarray(labels), attributes, out,
                            data=str(data), model=f"{segmenter.name} {segmenter.version}",
                            grouping="reference class", seed=seed, on_progress=on_progress)


def summarise_cohort(latents: np.ndarray, labels: np.ndarray,
                     attributes: list[dict[str, Any] | None], out: Path, *, data: str,
                     model: str, grouping: str, seed: int = 0,
                     on_progress: Callable[[str, int, int], None] | None = None
                     ) -> dict[str, Any]:
    """Nine clusterings, the best one, t-SNE pictures, per-class and per-cluster tables and a
    linear probe; writes ``cohort.json`` and ``cohort.md``."""
    from radlens.models.metrics import linear_probe

    if len(latents) < 4:
        raise ValueError(f"a cohort needs at least 4 images, got {len(latents)}")
    scores, labelings = run_clusterings(
        latents, seed=seed,
        on_done=(lambda name: on_progress("clustering", ALGORITHMS.index(name) + 1,
                                          len(ALGORITHMS))) if on_progress else None)
    chosen = best(scores)
    clusters = labelings[chosen.algorithm]
    out.mkdir(parents=True, exist_ok=True)
    tsne_pictures(latents, labels, clusters, chosen.algorithm, out, seed)
    per_class = attribute_table({k: [i for i, y in enumerate(labels) if y == c]
                                 for c, k in enumerate(LABELS)}, attributes, labels)
    per_cluster = attribute_table(
        {("noise" if c < 0 else f"cluster {c}"): [i for i, v in enumerate(clusters) if v == c]
         for c in sorted(set(clusters.tolist()))}, attributes, labels)
    report = {
        "data": data, "images": int(len(latents)), "model": model, "grouping": grouping,
        "latent_size": int(latents.shape[1]),
        "clustering": [asdict(s) for s in scores], "best": chosen.algorithm,
        "linear_probe": linear_probe(latents, labels, seed),
        "per_class": per_class, "per_cluster": per_cluster,
        "pictures": ["tsne_classes.png", "tsne_clusters.png"],
    }
    (out / "cohort.json").write_text(json.dumps(report, indent=2))
    (out / "cohort.md").write_text(markdown_report(report))
    return report


def analyse_agent(state_url: str, out: Path, *, latent: str = "image", seed: int = 0,
                  on_progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """The cohort over everything the agent processed (each study's latest job, from the state
    database at ``state_url``), grouped by the model's predictions. ``latent`` "image": one
    sample per frame (its global latent, its largest lesion's attributes); "lesion": one sample
    per lesion (the latent pooled inside it, its own measurements)."""
    from radlens.agent.analyses import load_frames, load_lesions
    from radlens.db import redacted

    if latent == "image":
        frames = load_frames(state_url)
        samples = [(r["latent"], r["predicted_class"], r["largest_lesion"]) for r in frames]
    elif latent == "lesion":
        lesions = load_lesions(state_url)
        samples = [(r["latent"], r["lesion_class"], r["measurements"]) for r in lesions]
    else:
        raise ValueError(f"latent must be 'image' or 'lesion', not {latent!r}")
    if not samples:
        raise ValueError(f"no analysed {'lesions' if latent == 'lesion' else 'frames'} in "
                         f"{redacted(state_url)} (has the agent processed studies with the "
                         "model on?)")
    latents = np.stack([s[0] for s in samples])
    labels = np.array([LABELS.index(s[1]) for s in samples])
    attributes = [_attributes(s[2]) for s in samples]
    return summarise_cohort(latents, labels, attributes, out,
                            data=f"agent data {redacted(state_url)}",
                            model="as recorded per job",
                            grouping=f"predicted class, one sample per {latent}",
                            seed=seed, on_progress=on_progress)


def _attributes(lesion: dict[str, Any] | None) -> dict[str, Any] | None:
    if lesion is None:
        return None
    return {"area_px": lesion["area_px"], "area_mm2": lesion["area_mm2"],
            "compactness": lesion["compactness"], "edge_sharpness": lesion["edge_sharpness"],
            "centroid_x": lesion["centroid_fraction"][0],
            "centroid_y": lesion["centroid_fraction"][1],
            "border_irregularity": lesion["border_irregularity"],
            "asymmetry": lesion["asymmetry"]}
