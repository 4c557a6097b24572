"""The centroid router (mfli.retrieval.router): its compiled top-clusters equal a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest

from mfli.retrieval.router import ClusterRouter


@pytest.mark.parametrize("sizes", [(37, 1), (203, 130), (4, 9)])
def test_flat_facets_probe_the_best_clusters_by_query_dot_centroid_best_first(sizes):
    """Facets under the grouping threshold score every centroid (four rows at a time, plus a tail): the
    probe returns each facet's ``clusters`` best by ``q_f . centroid``, best first, and all of a facet's
    clusters when it has fewer."""
    rng = np.random.default_rng(len(sizes) + sizes[0])
    cents = [rng.standard_normal((n, 24)).astype(np.float32) for n in sizes]
    q = rng.standard_normal((len(sizes), 24)).astype(np.float32)
    router = ClusterRouter.build(cents)
    facets, clusters = router.probe(q, 8, 4)
    for f, c in enumerate(cents):
        scores = c.astype(np.float64) @ q[f].astype(np.float64)
        expect = np.argsort(-scores, kind="stable")[: min(8, len(c))]
        got = clusters[facets == f]
        np.testing.assert_array_equal(got, expect)


def test_grouped_facets_reach_the_best_clusters_through_their_groups():
    """A facet over the grouping threshold scores group centroids first: with every group probed it
    returns exactly the flat answer; with a few groups, clusters of the best groups only."""
    rng = np.random.default_rng(5)
    cents = rng.standard_normal((300, 16)).astype(np.float32)
    q = rng.standard_normal((1, 16)).astype(np.float32)
    flat = ClusterRouter.build([cents])
    grouped = ClusterRouter.build([cents], group_above=64)
    assert grouped.group_base[-1] > 0, "the facet was grouped"
    groups = int(grouped.group_base[-1])
    np.testing.assert_array_equal(grouped.probe(q, 10, groups)[1], flat.probe(q, 10, groups)[1])
    _, few = grouped.probe(q, 10, 2)
    assert len(few) == 10 and len(set(few.tolist())) == 10
