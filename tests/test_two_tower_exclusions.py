"""Two-tower retrieval past large exclusion sets (a heavy user's seen items) stays exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp

from pipeline.artifacts import load_artifacts
from pipeline.factory import online_state_for
from retrieval.two_tower.source import TwoTowerSource


def test_retrieval_past_a_heavy_exclusion_equals_exact_search(
    tiny_bundle: tuple[Path, Path],
) -> None:
    artifacts = load_artifacts(tiny_bundle[1])
    tower = artifacts.retrieval.sources_["two_tower"]
    assert isinstance(tower, TwoTowerSource)
    users = online_state_for(artifacts).batch(artifacts.users.to_ids(np.arange(6)), now=0)
    n, n_items, k = len(users), tower.n_items, 10
    scores = tower.score(users, np.tile(np.arange(n_items), (n, 1)))
    scores[:, ~tower.in_index_] = -np.inf
    best_first = np.argsort(-scores, axis=1, kind="stable")
    # Row 0 excludes its own best 4k items: more than the first search's slack of k, so only a
    # second, wider search can fill it. The other rows exclude one item each.
    excluded = [best_first[0, : 4 * k]] + [best_first[r, r : r + 1] for r in range(1, n)]
    exclude = sp.csr_matrix(
        (
            np.ones(sum(e.size for e in excluded), np.float32),
            (np.repeat(np.arange(n), [e.size for e in excluded]), np.concatenate(excluded)),
        ),
        shape=(n, n_items),
    )
    got = tower.retrieve(users, k, exclude=exclude)
    for row in range(n):
        allowed = np.setdiff1d(best_first[row], excluded[row])
        assert np.isin(got.item_idx[row], allowed).all(), row
        # The best k allowed scores (compared as scores: near-ties may swap items).
        best_allowed = np.sort(scores[row, allowed])[::-1][:k]
        np.testing.assert_allclose(got.scores[row], best_allowed, rtol=1e-5, err_msg=str(row))
