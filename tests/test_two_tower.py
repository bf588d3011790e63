"""Two-tower retrieval: the contract, known answers on a clustered world, the loss by hand,
point-in-time histories, determinism, sparse id-table training, online re-encoding and live
catalogue updates."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data.catalog import UNKNOWN_TIME, ItemCatalog
from data.errors import ConfigError, DataError
from data.idmap import IdMap
from data.interactions import Interactions
from retrieval.base import PAD_ITEM, UserBatch
from retrieval.index_config import IndexConfig
from retrieval.two_tower import (
    PointInTimeHistory,
    TowerFeatures,
    TwoTowerConfig,
    TwoTowerSource,
    train_two_tower,
)
from retrieval.two_tower.config import SPARSE_AUTO_MIN_ROWS
from retrieval.two_tower.model import age_buckets
from retrieval.two_tower.train import (
    CURVES_JSON,
    CURVES_PNG,
    accidental_hits,
    bpr_loss,
    candidate_log_q,
    clip_grad_norm,
    sampled_softmax_loss,
)
from tests.retrieval_contract import (
    HISTORY,
    N_CATEGORIES,
    N_ITEMS,
    CandidateSourceContract,
    clustered_log,
)

# Tiny towers: a fit of the 40-user clustered log takes a fraction of a second. One thread:
# 16-wide layers gain nothing from intra-op parallelism, and on a shared machine the waiting
# threads of torch's default pool stall every step.
TINY = TwoTowerConfig(
    embedding_dim=16,
    hidden_dims=(32,),
    output_dim=16,
    history_length=HISTORY,
    batch_size=64,
    max_epochs=20,
    learning_rate=1e-2,
    eval_k=5,
    num_threads=1,
)


def cluster_of(items: np.ndarray) -> np.ndarray:
    """clustered_log puts item i in category i % 3 and user u in cluster u % 3."""
    return items % N_CATEGORIES


def all_users(log: Interactions) -> UserBatch:
    return UserBatch.from_interactions(log, np.arange(log.n_users), history_length=HISTORY)


def without_items(log: Interactions, items: list[int]) -> Interactions:
    """``log`` minus the events of ``items``: they stay in the catalogue, with no trained id."""
    keep = ~np.isin(log.item_idx, items)
    return Interactions(
        log.users, log.items, log.user_idx[keep], log.item_idx[keep], log.timestamp[keep],
        log.weight[keep],
    )  # fmt: skip


@pytest.fixture(scope="module")
def clustered() -> tuple[Interactions, ItemCatalog]:
    return clustered_log()


@pytest.fixture(scope="module")
def trained(clustered: tuple[Interactions, ItemCatalog]) -> TwoTowerSource:
    """A fitted source shared by the read-only tests (tests that mutate fit their own)."""
    log, catalog = clustered
    return TwoTowerSource(TINY).fit(log, catalog)


class TestTwoTowerContract(CandidateSourceContract):
    def make_source(self) -> TwoTowerSource:
        return TwoTowerSource(TINY)


# ------------------------------------------------------------------------------ known answers
def test_top1_is_in_the_users_own_cluster(
    trained: TwoTowerSource, clustered: tuple[Interactions, ItemCatalog]
) -> None:
    log, _ = clustered
    users = all_users(log)
    top = trained.retrieve(users, 1, exclude=users.history_matrix(log.n_items)).item_idx[:, 0]
    own = cluster_of(top) == np.arange(log.n_users) % N_CATEGORIES
    assert own.mean() >= 0.8


def test_unknown_user_is_personalised_from_history(
    trained: TwoTowerSource, clustered: tuple[Interactions, ItemCatalog]
) -> None:
    log, _ = clustered
    known = all_users(log)
    # The same histories, presented as users the model has never seen.
    unknown = UserBatch(
        np.full(len(known), -1, np.int32), known.recent_items, known.recent_times, known.now
    )
    top = trained.retrieve(unknown, 1, exclude=unknown.history_matrix(log.n_items)).item_idx
    own = cluster_of(top[:, 0]) == np.arange(log.n_users) % N_CATEGORIES
    assert own.mean() >= 0.8


def test_training_loss_decreases(trained: TwoTowerSource) -> None:
    losses = [record.train_loss for record in trained.curves_.records]
    assert len(losses) == TINY.max_epochs
    assert losses[-1] < 0.85 * losses[0]


@pytest.mark.parametrize(
    "variant",
    [
        {"loss": "bpr"},
        {"pooling": "attention"},
        {"n_uniform_negatives": 16},
        {"logq_correction": False},
        {"sparse_embeddings": True},
    ],
    ids=["bpr", "attention", "mixed-negatives", "no-logq", "sparse-ids"],
)
def test_variants_learn_the_clusters(
    variant: dict[str, object], clustered: tuple[Interactions, ItemCatalog]
) -> None:
    log, catalog = clustered
    source = TwoTowerSource(replace(TINY, **variant)).fit(log, catalog)  # type: ignore[arg-type]
    users = all_users(log)
    top = source.retrieve(users, 1, exclude=users.history_matrix(log.n_items)).item_idx[:, 0]
    assert (cluster_of(top) == np.arange(log.n_users) % N_CATEGORIES).mean() >= 0.8


# ------------------------------------------------------------------------------ the loss
def test_accidental_hits_mask_same_item_and_same_user_but_not_the_positive() -> None:
    positives = torch.tensor([1, 2, 1])
    users = torch.tensor([0, 1, 1])
    candidates = torch.tensor([1, 2, 1, 3])  # three in-batch columns + one sampled item
    candidate_users = torch.tensor([0, 1, 1, -1])
    hits = accidental_hits(positives, users, candidates, candidate_users)
    expected = [
        [False, False, True, False],  # column 2 is item 1 again
        [False, False, True, False],  # column 2 is another event of user 1
        [True, True, False, False],  # item 1 again; user 1 again
    ]
    np.testing.assert_array_equal(hits.numpy(), expected)


def test_sampled_softmax_subtracts_log_q_and_masks_hits() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5, -0.2], [0.3, 0.8, 0.7, 0.0], [0.6, 0.4, 0.2, 0.1]])
    hits = torch.tensor(
        [[False, False, True, False], [False, False, True, False], [True, True, False, False]]
    )
    log_q = torch.tensor([-0.5, -1.5, -0.5, -2.0])
    temperature = 0.5
    # By hand: logit = s / T - log q over the unmasked columns, cross-entropy of the diagonal.
    logits = scores.numpy() / temperature - log_q.numpy()[None, :]
    expected = []
    for row in range(3):
        keep = ~hits.numpy()[row]
        expected.append(np.log(np.exp(logits[row, keep]).sum()) - logits[row, row])
    loss = sampled_softmax_loss(scores, hits, temperature, log_q)
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-6)
    # A masked score has no influence on the loss.
    moved = scores.clone()
    moved[0, 2] = 50.0
    assert float(sampled_softmax_loss(moved, hits, temperature, log_q)) == pytest.approx(
        float(loss), rel=1e-6
    )
    # logQ matters: without it the loss differs; a constant log q shifts nothing.
    plain = sampled_softmax_loss(scores, hits, temperature, None)
    assert float(plain) != pytest.approx(float(loss), rel=1e-3)
    constant = sampled_softmax_loss(scores, hits, temperature, torch.full((4,), -3.0))
    assert float(constant) == pytest.approx(float(plain), rel=1e-6)


def test_candidate_log_q_is_the_expected_count_in_the_candidate_set() -> None:
    probability = torch.tensor([0.5, 0.25, 0.25, 0.0])
    candidates = torch.tensor([0, 1, 0, 3])
    log_q = candidate_log_q(probability, candidates, n_in_batch=3, n_uniform=2, n_items=4)
    expected = np.log([3 * 0.5 + 0.5, 3 * 0.25 + 0.5, 3 * 0.5 + 0.5, 0.5])
    np.testing.assert_allclose(log_q.numpy(), expected, rtol=1e-6)


def test_bpr_loss_by_hand() -> None:
    scores = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.4, 0.4]])
    hits = torch.tensor([[False, False, True], [False, False, False]])
    # Pairs: row 0 vs column 1; row 1 vs columns 0 and 2.
    margins = np.array([1.0 - 0.0, 0.4 - 0.2, 0.4 - 0.4]) / 0.1
    expected = np.mean(np.log1p(np.exp(-margins)))
    assert float(bpr_loss(scores, hits, 0.1)) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------ point in time
def brute_force_history(
    users: np.ndarray, items: np.ndarray, times: np.ndarray, event: int, length: int
) -> list[int]:
    """The user's items strictly before the event, latest first (later log row first on ties)."""
    earlier = [j for j in range(len(users)) if users[j] == users[event] and times[j] < times[event]]
    earlier.sort(key=lambda j: (times[j], j), reverse=True)
    picked = [int(items[j]) for j in earlier[:length]]
    return picked + [PAD_ITEM] * (length - len(picked))


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 9), st.integers(0, 12)),
        min_size=1,
        max_size=40,
    ),
    length=st.integers(1, 5),
)
def test_history_is_point_in_time(events: list[tuple[int, int, int]], length: int) -> None:
    events.sort(key=lambda event: event[2])  # an Interactions log is sorted by time
    users, items, times = (np.array(column, dtype=np.int64) for column in zip(*events, strict=True))
    history = PointInTimeHistory(users, items, times, length).gather(np.arange(len(events)))
    for event in range(len(events)):
        expected = brute_force_history(users, items, times, event, length)
        assert history[event].tolist() == expected


def test_history_matches_the_serving_view_of_the_log_before_each_event(
    clustered: tuple[Interactions, ItemCatalog],
) -> None:
    """Training features == what UserBatch.from_interactions(log.before(t)) gives at serving."""
    log, _ = clustered
    history = PointInTimeHistory(log.user_idx, log.item_idx, log.timestamp, HISTORY)
    for event in range(0, len(log), 7):
        state = UserBatch.from_interactions(
            log.before(int(log.timestamp[event])),
            log.user_idx[event : event + 1],
            history_length=HISTORY,
        )
        np.testing.assert_array_equal(history.gather(np.array([event]))[0], state.recent_items[0])


# ------------------------------------------------------------------------------ determinism
@pytest.mark.parametrize("sparse", [False, True], ids=["dense-ids", "sparse-ids"])
def test_same_seed_same_weights_and_candidates(
    sparse: bool, clustered: tuple[Interactions, ItemCatalog]
) -> None:
    log, catalog = clustered
    config = replace(TINY, max_epochs=5, sparse_embeddings=sparse)
    first = TwoTowerSource(config).fit(log, catalog)
    second = TwoTowerSource(config).fit(log, catalog)
    for name, weights in first.model_.state_dict().items():
        assert torch.equal(weights, second.model_.state_dict()[name]), name
    users = all_users(log)
    np.testing.assert_array_equal(
        first.retrieve(users, 10).item_idx, second.retrieve(users, 10).item_idx
    )
    other = TwoTowerSource(replace(config, seed=1)).fit(log, catalog)
    weights = other.model_.state_dict()["item_embedding.weight"]
    assert not torch.equal(weights, first.model_.state_dict()["item_embedding.weight"])


def test_training_leaves_the_global_torch_rng_alone(
    clustered: tuple[Interactions, ItemCatalog],
) -> None:
    log, catalog = clustered
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    TwoTowerSource(replace(TINY, max_epochs=1)).fit(log, catalog)
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------------------ online updates
def test_new_interactions_move_the_user_without_retraining(
    trained: TwoTowerSource, clustered: tuple[Interactions, ItemCatalog]
) -> None:
    log, _ = clustered
    users = all_users(log)
    new_cluster = 1
    fresh = np.flatnonzero(cluster_of(np.arange(N_ITEMS)) == new_cluster)[:5].astype(np.int32)
    shifts = []
    for user in (0, 3, 6, 9):  # cluster-0 users, who never touched cluster 1
        before = users.take([user])
        recent = np.concatenate([fresh, before.recent_items[0]])[None, :HISTORY]
        after = UserBatch(before.user_idx, recent, np.zeros_like(recent, np.int64), before.now)
        # Same exclusions on both sides, so the candidate pools are equal.
        exclude = after.history_matrix(log.n_items)
        share = [
            (
                cluster_of(trained.retrieve(state, 10, exclude=exclude).item_idx) == new_cluster
            ).mean()
            for state in (before, after)
        ]
        shifts.append(share[1] - share[0])
    assert min(shifts) >= 0 and np.mean(shifts) > 0.1


def extended_catalog(catalog: ItemCatalog, category: int) -> tuple[ItemCatalog, int]:
    """The clustered catalogue plus one new item ``i030`` in ``category``."""
    items = catalog.items.extend(["i030"])
    frame = pl.DataFrame(
        {
            "item_id": items.ids,
            "categories": [[f"c{i % N_CATEGORIES}"] for i in range(N_ITEMS)] + [[f"c{category}"]],
            "created_at": np.zeros(len(items), dtype=np.int64),
        }
    )
    return ItemCatalog.from_frame(frame, items), N_ITEMS


def test_added_item_is_retrievable_without_refitting(
    clustered: tuple[Interactions, ItemCatalog],
) -> None:
    log, catalog = clustered
    source = TwoTowerSource(TINY).fit(log, catalog)
    bigger, new_item = extended_catalog(catalog, category=2)
    source.add_items([new_item], bigger)
    assert source.n_items == N_ITEMS + 1 and source.in_index_[new_item]
    users = all_users(log).take(np.arange(2, log.n_users, N_CATEGORIES))  # cluster-2 users
    out = source.retrieve(users, 10, exclude=users.history_matrix(source.n_items))
    found = (out.item_idx == new_item).any(axis=1)
    assert found.mean() >= 0.8
    # Its score is the same cosine that score() gives the ranker.
    rows, cols = np.nonzero(out.item_idx == new_item)
    direct = source.score(users, np.full((len(users), 1), new_item))[rows, 0]
    np.testing.assert_allclose(out.scores[rows, cols], direct, rtol=1e-5, atol=1e-6)


def test_removed_items_are_never_returned_and_state_survives_save(
    clustered: tuple[Interactions, ItemCatalog], tmp_path: Path
) -> None:
    log, catalog = clustered
    source = TwoTowerSource(TINY).fit(log, catalog)
    bigger, new_item = extended_catalog(catalog, category=0)
    source.add_items([new_item], bigger)
    retired = np.arange(0, N_ITEMS, 2)
    assert source.remove_items(retired) == retired.size
    users = all_users(log)
    out = source.retrieve(users, 20)
    assert not np.isin(out.item_idx, retired).any()
    source.save(tmp_path / "tt")
    loaded = TwoTowerSource.load(tmp_path / "tt")
    again = loaded.retrieve(users, 20)
    np.testing.assert_array_equal(out.item_idx, again.item_idx)
    np.testing.assert_allclose(out.scores, again.scores, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ features & API
def test_score_and_vectors_for_the_ranker(
    trained: TwoTowerSource, clustered: tuple[Interactions, ItemCatalog]
) -> None:
    log, _ = clustered
    users = all_users(log).take([0, 1])
    out = trained.retrieve(users, 5)
    scores = trained.score(users, out.item_idx)
    np.testing.assert_allclose(scores, out.scores, rtol=1e-5, atol=1e-6)
    padded = np.array([[0, PAD_ITEM], [N_ITEMS + 5, 1]])
    with_pad = trained.score(users, padded)
    assert np.isnan(with_pad[0, 1]) and np.isnan(with_pad[1, 0])
    assert np.isfinite(with_pad[0, 0]) and np.isfinite(with_pad[1, 1])
    np.testing.assert_allclose(np.linalg.norm(trained.user_vectors(users), axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        np.linalg.norm(trained.item_vectors(np.arange(N_ITEMS)), axis=1), 1.0, rtol=1e-5
    )


def test_new_items_use_the_features_only_path() -> None:
    log, catalog = clustered_log()
    # Drop item 0's events: it stays in the catalogue but has no trained id row.
    cold = without_items(log, [0])
    features = TowerFeatures.build(catalog, cold.item_counts, n_users=cold.n_users, config=TINY)
    assert not features.item_known[0] and features.item_known[1:].all()
    inputs = features.item_inputs(np.array([0, 3]), 0)
    assert inputs.ids.tolist() == [features.n_id_items, 3]  # the "unknown item" row, then id 3
    source = TwoTowerSource(TINY).fit(cold, catalog)
    users = all_users(cold).take(np.arange(0, cold.n_users, N_CATEGORIES))  # cluster 0
    # Item 0 competes with the 4 own-cluster items each user has not seen, and 20 others.
    out = source.retrieve(users, 5, exclude=users.history_matrix(N_ITEMS))
    assert (out.item_idx == 0).any(axis=1).mean() >= 0.8


def test_user_features_are_fed_to_the_user_tower(
    clustered: tuple[Interactions, ItemCatalog], tmp_path: Path
) -> None:
    log, catalog = clustered
    dense = np.eye(N_CATEGORIES, dtype=np.float32)[np.arange(log.n_users) % N_CATEGORIES]
    source = TwoTowerSource(replace(TINY, max_epochs=3)).fit(log, catalog, user_features=dense)
    assert source.model_.user_mlp[0].in_features == 2 * TINY.embedding_dim + N_CATEGORIES
    source.save(tmp_path / "tt")
    loaded = TwoTowerSource.load(tmp_path / "tt")
    users = all_users(log)
    np.testing.assert_allclose(source.user_vectors(users), loaded.user_vectors(users), atol=1e-6)
    with pytest.raises(DataError, match="user_features"):
        TwoTowerSource(TINY).fit(log, catalog, user_features=dense[:5])


def test_early_stopping_restores_the_best_epoch_and_writes_curves(tmp_path: Path) -> None:
    log, catalog = clustered_log()
    # The last two events of every user are validation; the model must not see them.
    rank = np.empty(len(log), dtype=np.int64)
    order = np.lexsort((log.timestamp, log.user_idx))
    starts = np.searchsorted(log.user_idx[order], log.user_idx[order])
    rank[order] = np.arange(len(log)) - starts
    held = rank >= 4
    train, valid = (
        Interactions(log.users, log.items, log.user_idx[m], log.item_idx[m], log.timestamp[m],
                     log.weight[m])
        for m in (~held, held)
    )  # fmt: skip
    config = replace(TINY, max_epochs=40, patience=2, eval_k=5)
    features = TowerFeatures.build(catalog, train.item_counts, n_users=train.n_users, config=config)
    result = train_two_tower(train, features, config, valid=valid)
    curves = result.curves
    recalls = [record.valid_recall or 0.0 for record in curves.records]
    assert all(record.valid_recall is not None for record in curves.records)
    assert all(record.valid_loss is not None for record in curves.records)
    assert all(0 <= r <= 1 for r in recalls)
    assert curves.best_epoch == 1 + int(np.argmax(recalls))
    assert curves.stopped_early
    assert len(curves.records) == curves.best_epoch + config.patience
    assert max(recalls) > 0.5  # 2 of the 4 unseen own-cluster items; random top-5 finds ~0.2
    # The kept weights are the best epoch's: a run that ends there (same seed) has them too.
    shorter = train_two_tower(
        train, features, replace(config, max_epochs=curves.best_epoch), valid=valid
    )
    kept, reference = result.model.state_dict(), shorter.model.state_dict()
    assert all(torch.equal(kept[name], reference[name]) for name in kept)
    json_path, png_path = curves.save(tmp_path)
    assert json.loads(json_path.read_text())["best_epoch"] == curves.best_epoch
    assert png_path.name == CURVES_PNG and png_path.read_bytes()[:4] == b"\x89PNG"
    assert json_path.name == CURVES_JSON


def test_source_save_writes_curves_and_loads_with_weights_only(
    trained: TwoTowerSource, tmp_path: Path
) -> None:
    trained.save(tmp_path / "tt")
    assert (tmp_path / "tt" / CURVES_JSON).is_file() and (tmp_path / "tt" / CURVES_PNG).is_file()
    state = torch.load(tmp_path / "tt" / "model.pt", weights_only=True)
    assert set(state) == set(trained.model_.state_dict())
    loaded = TwoTowerSource.load(tmp_path / "tt")
    assert loaded.curves_.to_dict() == trained.curves_.to_dict()


def test_approximate_index_scores_are_exact_cosines(
    clustered: tuple[Interactions, ItemCatalog],
) -> None:
    log, catalog = clustered
    source = TwoTowerSource(TINY, IndexConfig(kind="hnsw")).fit(log, catalog)
    users = all_users(log).take([0, 1, 2])
    out = source.retrieve(users, 5)
    np.testing.assert_allclose(source.score(users, out.item_idx), out.scores, rtol=1e-5)


# ------------------------------------------------------------------------------ sparse id tables
def test_auto_sparse_ids_above_the_row_threshold_only() -> None:
    auto = TwoTowerConfig()
    # Each table has one extra "unknown" row.
    assert not auto.sparse_id_tables(SPARSE_AUTO_MIN_ROWS // 2 - 1, SPARSE_AUTO_MIN_ROWS // 2 - 1)
    assert auto.sparse_id_tables(SPARSE_AUTO_MIN_ROWS // 2, SPARSE_AUTO_MIN_ROWS // 2 - 1)
    assert auto.sparse_id_tables(100_000, 1_000_000)
    assert not auto.sparse_id_tables(5_000, 2_000)  # the embedded dataset stays dense
    assert TwoTowerConfig(sparse_embeddings=True).sparse_id_tables(40, 30)
    assert not TwoTowerConfig(sparse_embeddings=False).sparse_id_tables(100_000, 1_000_000)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense-ids", "sparse-ids"])
def test_sparse_steps_leave_unlooked_rows_alone_and_dense_parameters_decay(
    sparse: bool, clustered: tuple[Interactions, ItemCatalog]
) -> None:
    """Epoch 2 against epoch 1 of the same seeded run, on rows whose gradient is always 0.

    Decoupled weight decay multiplies such a row by ``1 - lr * wd`` per step (AdamW's moments
    stay 0); SparseAdam does not see it at all.
    """
    log, catalog = clustered
    cold = [0, 1]  # in the catalogue, no training events: their id rows are never looked up
    log = without_items(log, cold)
    config = replace(TINY, weight_decay=0.5, sparse_embeddings=sparse)
    features = TowerFeatures.build(catalog, log.item_counts, n_users=log.n_users, config=config)
    after = [
        train_two_tower(log, features, replace(config, max_epochs=epochs)).model
        for epochs in (1, 2)
    ]
    steps = -(-len(log) // config.batch_size)
    decay = (1 - config.learning_rate * config.weight_decay) ** steps
    # Every item has an unknown release time: only age bucket 0 is ever used.
    assert (catalog.created_at == UNKNOWN_TIME).all()
    unused_ages = [model.age_embedding.weight[1:].detach() for model in after]
    torch.testing.assert_close(unused_ages[1], unused_ages[0] * decay, rtol=1e-5, atol=0)
    cold_rows = [model.item_embedding.weight[cold].detach() for model in after]
    if sparse:
        assert torch.equal(cold_rows[1], cold_rows[0])
    else:
        torch.testing.assert_close(cold_rows[1], cold_rows[0] * decay, rtol=1e-5, atol=0)
    # Rows the batches do look up are trained in both modes.
    looked_up = [model.item_embedding.weight[2:N_ITEMS].detach() for model in after]
    assert not torch.allclose(looked_up[1], looked_up[0] * decay, rtol=1e-3)


def test_sparse_ids_carry_the_l2_penalty_of_weight_decay(
    clustered: tuple[Interactions, ItemCatalog],
) -> None:
    log, catalog = clustered
    features = TowerFeatures.build(catalog, log.item_counts, n_users=log.n_users, config=TINY)

    def id_row_norms(weight_decay: float) -> float:
        config = replace(TINY, sparse_embeddings=True, weight_decay=weight_decay)
        model = train_two_tower(log, features, config).model
        rows = [model.user_embedding.weight[: log.n_users], model.item_embedding.weight[:N_ITEMS]]
        return float(torch.cat(rows).detach().norm(dim=1).mean())

    assert id_row_norms(weight_decay=1.0) < 0.5 * id_row_norms(weight_decay=0.0)


def test_clip_grad_norm_takes_sparse_gradients_like_torch_takes_dense_ones() -> None:
    """The same clipped gradients as torch's clip_grad_norm_ on their dense copies."""
    torch.manual_seed(0)
    table = torch.nn.Embedding(6, 3, sparse=True)
    layer = torch.nn.Linear(3, 2)
    # Row 1 is looked up twice: two pieces of one row in the (uncoalesced) sparse gradient.
    layer(table(torch.tensor([1, 1, 4]))).square().sum().backward()
    parameters: list[torch.Tensor] = [table.weight, layer.weight, layer.bias]
    dense = [torch.nn.Parameter(p.detach().clone()) for p in parameters]
    for copy, parameter in zip(dense, parameters, strict=True):
        assert parameter.grad is not None
        copy.grad = (
            parameter.grad.to_dense() if parameter.grad.is_sparse else parameter.grad.clone()
        )
    assert table.weight.grad is not None and not table.weight.grad.is_coalesced()
    max_norm = 0.1
    unclipped = torch.nn.utils.get_total_norm([c.grad for c in dense if c.grad is not None])
    assert float(unclipped) > 10 * max_norm  # so clipping does scale

    clip_grad_norm(parameters, max_norm)
    torch.nn.utils.clip_grad_norm_(dense, max_norm)
    for parameter, copy in zip(parameters, dense, strict=True):
        assert parameter.grad is not None and copy.grad is not None
        torch.testing.assert_close(parameter.grad.to_dense(), copy.grad)


def test_sparse_training_returns_and_saves_an_ordinary_model(
    clustered: tuple[Interactions, ItemCatalog], tmp_path: Path
) -> None:
    log, catalog = clustered
    source = TwoTowerSource(replace(TINY, max_epochs=3, sparse_embeddings=True)).fit(log, catalog)
    assert not any(table.sparse for table in source.model_.id_tables)
    source.save(tmp_path / "tt")
    loaded = TwoTowerSource.load(tmp_path / "tt")
    assert not any(table.sparse for table in loaded.model_.id_tables)
    users = all_users(log)
    np.testing.assert_allclose(source.user_vectors(users), loaded.user_vectors(users), atol=1e-6)


# ------------------------------------------------------------------------------ input checks
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("embedding_dim", 0),
        ("hidden_dims", (16, -1)),
        ("item_id_dropout", 1.0),
        ("temperature", 0.0),
        ("pooling", "max"),
        ("loss", "hinge"),
        ("age_bucket_days", (7.0, 1.0)),
        ("device", "tpu"),
        ("num_threads", 0),
        ("sparse_embeddings", "yes"),
        ("sparse_embeddings", 1),
    ],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        TwoTowerConfig(**{field: value})  # type: ignore[arg-type]


def test_cuda_without_a_gpu_is_a_config_error(
    clustered: tuple[Interactions, ItemCatalog],
) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    log, catalog = clustered
    with pytest.raises(ConfigError, match="cuda"):
        TwoTowerSource(replace(TINY, device="cuda")).fit(log, catalog)


def test_misaligned_catalog_is_rejected(clustered: tuple[Interactions, ItemCatalog]) -> None:
    log, _ = clustered
    reversed_items = IdMap.from_frame(log.items.to_frame().with_columns(pl.col("index").reverse()))
    with pytest.raises(DataError, match="not aligned"):
        TwoTowerSource(TINY).fit(log, ItemCatalog.empty(reversed_items))


def test_validation_log_must_share_the_id_maps(
    clustered: tuple[Interactions, ItemCatalog],
) -> None:
    log, catalog = clustered
    other = Interactions.from_frame(
        pl.DataFrame(
            {"user_id": ["x"], "item_id": ["i000"], "timestamp": [5_000], "weight": [1.0]}
        ).cast({"weight": pl.Float32})
    )
    with pytest.raises(DataError, match="training id maps"):
        TwoTowerSource(TINY).fit(log, catalog, valid=other)


def test_age_buckets() -> None:
    day = 86_400
    created = np.array([0, 100 * day, 100 * day, 100 * day, 100 * day], dtype=np.int64)
    at = np.array([200 * day, 100 * day, 103 * day, 160 * day, 99 * day], dtype=np.int64)
    # unknown; 0 days -> < 1; 3 days -> [1, 7); 60 days -> [30, 90); released later -> newest.
    assert age_buckets(created, at, (1.0, 7.0, 30.0, 90.0)).tolist() == [0, 1, 2, 4, 1]
