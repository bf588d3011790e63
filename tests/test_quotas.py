"""Merge quotas learned on the validation window (retrieval/quotas.py, RetrievalStage)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from data.errors import ConfigError
from retrieval.base import PAD_ITEM
from retrieval.quotas import NOT_FOUND, coverage, learn_quotas, relevant_ranks
from tests.test_ranking_features import tiny_funnel


def test_relevant_ranks_known_answer() -> None:
    # user 0 engaged with items 1 and 4, user 1 with item 2.
    relevant = sp.csr_matrix(np.array([[0, 1, 0, 0, 1], [0, 0, 1, 0, 0]], dtype=np.float32))
    lists = {
        "a": np.array([[4, 0, 1], [3, PAD_ITEM, PAD_ITEM]]),
        "b": np.array([[1, 3, 0], [0, 1, 2]]),
    }

    ranks = relevant_ranks(lists, relevant)

    # pairs in row-major order: (0, 1), (0, 4), (1, 2)
    assert ranks.tolist() == [[2, 0], [0, NOT_FOUND], [NOT_FOUND, 2]]


def test_slots_go_to_the_source_that_finds_what_the_others_miss() -> None:
    # Source 0 finds 3 pairs in its first 2 slots and nothing deeper; source 1 finds 5 more
    # pairs at ranks 2-5 that source 0 never finds.
    ranks = np.array(
        [[0, NOT_FOUND], [1, NOT_FOUND], [1, 0]] + [[NOT_FOUND, r] for r in (2, 3, 4, 5, 5)],
        dtype=np.int32,
    )

    quotas = learn_quotas(ranks, n_candidates=8, step=2)

    assert quotas == [2, 6]
    assert coverage(ranks, quotas) == 1.0


def test_a_step_that_covers_nothing_goes_to_the_first_source() -> None:
    ranks = np.array([[0, 0]], dtype=np.int32)
    assert learn_quotas(ranks, n_candidates=7, step=2) == [5, 2]


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 5).flatmap(
        lambda s: st.tuples(
            st.just(s),
            st.lists(
                st.lists(st.integers(0, 40) | st.just(NOT_FOUND), min_size=s, max_size=s),
                max_size=30,
            ),
        )
    ),
    st.integers(1, 6),
    st.integers(0, 30),
)
def test_quotas_fill_the_list_keep_their_floor_and_only_add_coverage(
    sources_and_ranks: tuple[int, list[list[int]]], step: int, extra: int
) -> None:
    n_sources, rows = sources_and_ranks
    ranks = np.array(rows, dtype=np.int32).reshape(-1, n_sources)
    n_candidates = step * n_sources + extra

    quotas = learn_quotas(ranks, n_candidates, step)

    assert sum(quotas) == n_candidates and min(quotas) >= step
    assert coverage(ranks, quotas) >= coverage(ranks, [step] * n_sources)
    assert learn_quotas(ranks, n_candidates, step) == quotas


def test_a_floor_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ConfigError, match="floor"):
        learn_quotas(np.zeros((1, 3), dtype=np.int32), n_candidates=5, step=2)


def test_the_stage_learns_quotas_that_fill_its_candidate_list() -> None:
    stage = tiny_funnel(learn_quotas=True).retrieval
    quotas = [stage.config.quotas[name] for name in stage.source_names]

    assert sum(quotas) == stage.config.n_candidates == 60
    assert min(quotas) >= 60 // 20
