"""Per-batch memo of user vectors: computed once per funnel pass, never confused across batches."""

from __future__ import annotations

import gc

import numpy as np

from retrieval.base import LastBatchMemo, UserBatch


def batch(user: int) -> UserBatch:
    return UserBatch(
        user_idx=np.array([user], dtype=np.int32),
        recent_items=np.full((1, 2), -1, dtype=np.int32),
        recent_times=np.zeros((1, 2), dtype=np.int64),
        now=np.zeros(1, dtype=np.int64),
    )


def test_memo_computes_once_per_batch_and_again_for_a_new_batch() -> None:
    calls: list[int] = []

    def compute(users: UserBatch) -> int:
        calls.append(int(users.user_idx[0]))
        return int(users.user_idx[0]) * 10

    memo: LastBatchMemo[int] = LastBatchMemo()
    first = batch(1)
    assert memo.get(first, compute) == 10
    assert memo.get(first, compute) == 10
    assert calls == [1]
    second = batch(2)  # equal shape, different batch: recomputed
    assert memo.get(second, compute) == 20
    assert memo.get(first, compute) == 10  # only the latest batch is remembered
    assert calls == [1, 2, 1]
    memo.clear()
    assert memo.get(first, compute) == 10
    assert calls == [1, 2, 1, 1]


def test_memo_does_not_keep_a_batch_alive() -> None:
    memo: LastBatchMemo[int] = LastBatchMemo()
    memo.get(batch(3), lambda users: 30)
    gc.collect()
    # A later batch, possibly at the collected one's address, is computed afresh.
    assert memo.get(batch(4), lambda users: 40) == 40
