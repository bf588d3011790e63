"""One contract test suite that every candidate source inherits (implicit's test-mixin pattern).

A test module subclasses :class:`CandidateSourceContract` and implements ``make_source``; the
inherited tests then pin the behaviour every source owes the merger and the pipeline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from data.catalog import ItemCatalog
from data.errors import NotFittedError
from data.idmap import IdMap
from data.interactions import Interactions
from retrieval.base import PAD_ITEM, Candidates, CandidateSource, UserBatch

N_USERS, N_ITEMS, N_CATEGORIES = 40, 30, 3
HISTORY = 8


def events_frame(rows: list[tuple[str, str, int, float]]) -> pl.DataFrame:
    """A canonical interaction frame from (user_id, item_id, timestamp, weight) rows."""
    return pl.DataFrame(
        rows,
        schema={
            "user_id": pl.String,
            "item_id": pl.String,
            "timestamp": pl.Int64,
            "weight": pl.Float32,
        },
        orient="row",
    )


def clustered_log(seed: int = 0) -> tuple[Interactions, ItemCatalog]:
    """Users in 3 clusters, each clicking mostly items of its own category (a known structure)."""
    rng = np.random.default_rng(seed)
    item_category = np.arange(N_ITEMS) % N_CATEGORIES
    rows = []
    for user in range(N_USERS):
        home = user % N_CATEGORIES
        own = np.flatnonzero(item_category == home)
        picks = rng.choice(own, size=6, replace=False)
        for step, item in enumerate(picks):
            rows.append((f"u{user:03d}", f"i{item:03d}", 1_000 + 10 * user + step, 1.0))
    frame = events_frame(rows)
    items = IdMap.from_ids([f"i{i:03d}" for i in range(N_ITEMS)])
    log = Interactions.from_frame(frame, items=items)
    catalog = ItemCatalog.from_frame(
        pl.DataFrame(
            {
                "item_id": [f"i{i:03d}" for i in range(N_ITEMS)],
                "categories": [[f"c{c}"] for c in item_category],
                "created_at": np.zeros(N_ITEMS, dtype=np.int64),
            }
        ),
        items,
    )
    return log, catalog


class CandidateSourceContract:
    """Inherit and implement :meth:`make_source` (unfitted, seeded)."""

    def make_source(self) -> CandidateSource:
        raise NotImplementedError

    @pytest.fixture
    def fitted(self) -> tuple[CandidateSource, Interactions]:
        log, catalog = clustered_log()
        return self.make_source().fit(log, catalog), log

    def batch(self, log: Interactions, users: list[int]) -> UserBatch:
        return UserBatch.from_interactions(log, np.array(users), history_length=HISTORY)

    def test_is_a_candidate_source(self) -> None:
        assert isinstance(self.make_source(), CandidateSource)

    def test_retrieve_before_fit_raises(self) -> None:
        log, _ = clustered_log()
        with pytest.raises(NotFittedError):
            self.make_source().retrieve(self.batch(log, [0]), 5)

    def test_shapes_order_and_padding(self, fitted: tuple[CandidateSource, Interactions]) -> None:
        source, log = fitted
        out = source.retrieve(self.batch(log, [0, 1, 2]), 10)
        assert isinstance(out, Candidates)
        assert out.item_idx.shape == (3, 10) and out.item_idx.dtype == np.int32
        assert out.scores.dtype == np.float32
        valid = out.item_idx != PAD_ITEM
        assert ((out.item_idx >= PAD_ITEM) & (out.item_idx < log.n_items)).all()
        # padding only at the end of a row, and scores non-increasing over the valid prefix
        assert (np.diff(valid.astype(int), axis=1) <= 0).all()
        # compare neighbours that are both real candidates (padding scores are -inf)
        steps = np.diff(np.where(valid, out.scores, 0.0), axis=1)
        assert (steps[valid[:, 1:] & valid[:, :-1]] <= 1e-6).all()
        for row in out.item_idx:
            kept = row[row != PAD_ITEM]
            assert len(set(kept.tolist())) == kept.size, "duplicate candidates in a row"

    def test_exclude_is_respected(self, fitted: tuple[CandidateSource, Interactions]) -> None:
        source, log = fitted
        users = self.batch(log, [0, 1])
        seen = users.history_matrix(log.n_items)
        out = source.retrieve(users, 15, exclude=seen)
        for row, items in enumerate(out.item_idx):
            assert not set(items[items >= 0].tolist()) & set(seen[row].indices.tolist())

    def test_batch_invariance(self, fitted: tuple[CandidateSource, Interactions]) -> None:
        source, log = fitted
        alone = source.retrieve(self.batch(log, [4]), 8)
        together = source.retrieve(self.batch(log, [4, 7, 9]), 8)
        np.testing.assert_array_equal(alone.item_idx[0], together.item_idx[0])
        np.testing.assert_allclose(alone.scores[0], together.scores[0], rtol=1e-5, atol=1e-6)

    def test_unknown_user_gets_an_answer(
        self, fitted: tuple[CandidateSource, Interactions]
    ) -> None:
        source, log = fitted
        out = source.retrieve(self.batch(log, [-1]), 5)
        assert out.item_idx.shape == (1, 5)

    def test_save_load_round_trip(
        self, fitted: tuple[CandidateSource, Interactions], tmp_path: Path
    ) -> None:
        source, log = fitted
        source.save(tmp_path / "source")
        loaded = type(source).load(tmp_path / "source")  # type: ignore[attr-defined]
        users = self.batch(log, [0, 1, 2, 3])
        before, after = source.retrieve(users, 10), loaded.retrieve(users, 10)
        np.testing.assert_array_equal(before.item_idx, after.item_idx)
        np.testing.assert_allclose(before.scores, after.scores, rtol=1e-5, atol=1e-6)


def exclude_matrix(n_users: int, pairs: list[tuple[int, int]]) -> sp.csr_matrix:
    rows, cols = zip(*pairs, strict=True) if pairs else ((), ())
    return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, N_ITEMS))
