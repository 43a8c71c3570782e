from __future__ import annotations

import numpy as np
import pytest

from radlens.analysis.cohort import ALGORITHMS, best, cluster, run_clusterings, score


@pytest.fixture
def separated() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 8, (3, 8))  # apart in every dimension, as standardised latents
    labels = np.repeat([0, 1, 2], 40)
    return centres[labels] + rng.normal(0, 1, (120, 8)), labels


def test_kmeans_finds_well_separated_groups(separated):
    latents, truth = separated
    scores, labelings = run_clusterings(latents)
    assert [s.algorithm for s in scores] == list(ALGORITHMS)
    kmeans = next(s for s in scores if s.algorithm == "kmeans")
    assert kmeans.clusters == 3 and kmeans.silhouette > 0.5
    assert kmeans.calinski_harabasz > 100 and kmeans.davies_bouldin < 0.7
    found = labelings["kmeans"]
    # The same partition as the truth, whatever the cluster numbering.
    assert len({(int(a), int(b)) for a, b in zip(found, truth, strict=True)}) == 3
    assert best(scores).silhouette >= kmeans.silhouette


def test_dbscan_and_optics_do_what_their_settings_say(separated):
    latents, _ = separated
    all_noise = cluster(latents, "dbscan", dbscan_eps=0.01, min_samples=5)
    assert (all_noise == -1).all()
    one_blob = cluster(latents, "dbscan", dbscan_eps=1000.0, min_samples=5)
    assert set(one_blob.tolist()) == {0}
    three = cluster(latents, "dbscan", dbscan_eps=5.0, min_samples=5)
    assert len(set(three[three >= 0].tolist())) == 3
    strict = cluster(latents, "optics", min_samples=60)  # more than any group holds
    assert len(set(strict[strict >= 0].tolist())) <= 1
    loose = cluster(latents, "optics", min_samples=5)
    assert len(set(loose[loose >= 0].tolist())) >= 3


def test_noise_counts_as_a_group_in_the_scores(separated):
    latents, truth = separated
    labels = truth.copy()
    labels[::3] = -1  # a third of the points called noise
    scored = score(latents, labels, "dbscan")
    assert scored.noise == 40 and scored.clusters == 3
    assert scored.silhouette < score(latents, truth, "dbscan").silhouette
    assert score(latents, np.zeros(120, int), "x").silhouette is None
