"""Rule re-ranking: config, each rule's known answers, engine guarantees, explanations, fallback."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from data.catalog import UNKNOWN_TIME, ItemCatalog
from data.errors import ConfigError, DataError
from data.idmap import IdMap
from pipeline.funnel import top_k_minus_blocked
from reranking.config import (
    BoostConfig,
    CategoryCapConfig,
    ExplorationConfig,
    FilterBlockedConfig,
    FilterExcludedConfig,
    FilterSeenConfig,
    FilterUnavailableConfig,
    FreshnessBoostConfig,
    MMRConfig,
    PinsConfig,
    RerankerConfig,
    RuleConfig,
)
from reranking.engine import (
    INPUT_STEP,
    RankedList,
    RerankResult,
    RuleEngine,
    RuleReport,
    _in_longest_increasing,
)
from reranking.inputs import ItemSideInfo, RerankRequest, per_row_mask

PROPERTY = settings(max_examples=60, deadline=None)
DAY = 86_400
NOW = 1_700_000_000
N_ITEMS = 40
N_CATEGORIES = 5
ITEM_IDS = IdMap.from_ids([f"i{j:03d}" for j in range(N_ITEMS)])  # index j <-> id "i{j:03d}"
CATEGORY_NAMES = tuple(f"c{c}" for c in range(N_CATEGORIES))


def item_id(index: int) -> str:
    return f"i{index:03d}"


def ranked(rows: list[list[int]], scores: list[list[float]] | None = None) -> RankedList:
    """Rows padded with -1; scores default to len(row) .. 1 (descending)."""
    width = max((len(r) for r in rows), default=0)
    items = np.full((len(rows), width), -1, dtype=np.int32)
    values = np.full((len(rows), width), -np.inf, dtype=np.float32)
    for i, row in enumerate(rows):
        items[i, : len(row)] = row
        values[i, : len(row)] = scores[i] if scores is not None else np.arange(len(row), 0, -1)
    return RankedList(items, values)


def side_info(
    categories: list[int] | None = None,
    created_at: list[int] | None = None,
    available: list[bool] | None = None,
    embeddings: np.ndarray | None = None,
    n_items: int = N_ITEMS,
) -> ItemSideInfo:
    category = np.full(n_items, -1, dtype=np.int32)
    if categories is not None:
        category[: len(categories)] = categories
    created = np.full(n_items, UNKNOWN_TIME, dtype=np.int64)
    if created_at is not None:
        created[: len(created_at)] = created_at
    return ItemSideInfo(
        category,
        created,
        None if available is None else np.asarray(available, dtype=bool),
        embeddings,
    )


def request(n: int, **kwargs: Any) -> RerankRequest:
    kwargs.setdefault("user_keys", np.arange(n))
    return RerankRequest(np.full(n, NOW, dtype=np.int64), **kwargs)


def reranker(*rules: RuleConfig, **kwargs: Any) -> RuleEngine:
    return RuleEngine(
        RerankerConfig(tuple(rules)), item_ids=ITEM_IDS, category_names=CATEGORY_NAMES, **kwargs
    )


def items_of(result: RerankResult, row: int = 0) -> list[int]:
    row_items = result.item_idx[row]
    return row_items[row_items >= 0].tolist()


# ------------------------------------------------------------------------------ config

TOML = """
[[reranking.rules]]
name = "filter_seen"

[[reranking.rules]]
name = "filter_blocked"
item_ids = ["i001", "nope"]

[[reranking.rules]]
name = "boost"
mode = "add"
items = { "i002" = 0.5 }
categories = { "c1" = -0.25 }

[[reranking.rules]]
name = "freshness_boost"
max_age_days = 3.0

[[reranking.rules]]
name = "mmr"
relevance_weight = 0.5

[[reranking.rules]]
name = "category_cap"
max_per_category = 2

[[reranking.rules]]
name = "exploration"
positions = [9, 4]
sampling = "score"

[[reranking.rules]]
name = "pins"
items = { "i007" = 0 }
"""


def test_config_from_toml_round_trips() -> None:
    table = tomllib.loads(TOML)["reranking"]
    config = RerankerConfig.from_mapping(table)
    assert [rule.name for rule in config.rules] == [
        "filter_seen",
        "filter_blocked",
        "boost",
        "freshness_boost",
        "mmr",
        "category_cap",
        "exploration",
        "pins",
    ]
    assert config.rules[5] == CategoryCapConfig(max_per_category=2)
    assert config.rules[6].positions == (4, 9)  # type: ignore[union-attr]
    assert RerankerConfig.from_mapping(config.to_mapping()) == config
    # Every name resolves (the unknown blocked id is ignored: nothing to block).
    RuleEngine(config, item_ids=ITEM_IDS, category_names=CATEGORY_NAMES)


def test_default_config_is_the_four_filters() -> None:
    names = [rule.name for rule in RerankerConfig.from_mapping(None).rules]
    assert sorted(names) == [
        "filter_blocked",
        "filter_excluded",
        "filter_seen",
        "filter_unavailable",
    ]


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({"rules": [{"name": "diversify"}]}, ["rules[0]", "diversify", "known"]),
        ({"rules": [{"max_per_category": 2}]}, ["rules[0]", "None"]),
        (
            {"rules": [{"name": "category_cap", "max_per_categry": 2}]},
            ["category_cap", "max_per_categry"],
        ),
        (
            {"rules": [{"name": "category_cap", "max_per_category": 0}]},
            ["category_cap.max_per_category"],
        ),
        (
            {"rules": [{"name": "filter_seen"}, {"name": "mmr", "relevance_weight": 1.5}]},
            ["rules[1]", "mmr.relevance_weight"],
        ),
        ({"rules": [{"name": "mmr", "similarity": "jaccard"}]}, ["mmr.similarity", "jaccard"]),
        ({"rules": [{"name": "exploration", "positions": [3, 3]}]}, ["exploration.positions"]),
        ({"rules": [{"name": "exploration", "positions": [True]}]}, ["exploration.positions"]),
        ({"rules": [{"name": "pins", "items": {"a": 1, "b": 1}}]}, ["pins.items", "one position"]),
        ({"rules": [{"name": "boost", "items": {"a": 0.0}}]}, ["boost.items", "> 0"]),
        ({"rules": [{"name": "boost", "mode": "pow"}]}, ["boost.mode", "pow"]),
        (
            {"rules": [{"name": "filter_blocked", "item_ids": [42]}]},
            ["filter_blocked.item_ids", "strings"],
        ),
        (
            {"rules": [{"name": "freshness_boost", "max_age_days": 0}]},
            ["freshness_boost.max_age_days"],
        ),
        ({"rule": []}, ["unknown key", "rule"]),
    ],
)
def test_config_errors_name_the_rule_and_field(table: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        RerankerConfig.from_mapping(table)
    for word in words:
        assert word in str(caught.value)


def test_names_are_resolved_when_the_engine_is_built() -> None:
    with pytest.raises(ConfigError, match=r"pins\.items.*nope"):
        reranker(PinsConfig({"nope": 0}))
    with pytest.raises(ConfigError, match=r"boost\.categories.*jazz"):
        reranker(BoostConfig(categories={"jazz": 2.0}))
    with pytest.raises(ConfigError, match="no item id map"):
        RuleEngine(RerankerConfig((PinsConfig({"i001": 0}),)))
    with pytest.raises(ConfigError, match="no filter_blocked rule"):
        reranker(FilterSeenConfig(), blocked_items=[3])


# ------------------------------------------------------------------------------ filters


def test_filters_remove_exactly_the_filtered_items_and_say_why() -> None:
    rows = [[0, 1, 2, 3, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]]
    seen = sp.csr_matrix(([1.0, 1.0], ([0, 1], [1, 2])), shape=(2, N_ITEMS))
    exclude = [np.array([3]), np.array([], dtype=np.int64)]
    available = [True] * N_ITEMS
    available[5] = False
    engine = reranker(
        FilterSeenConfig(),
        FilterExcludedConfig(),
        FilterUnavailableConfig(),
        FilterBlockedConfig((item_id(6),)),
        blocked_items=[7],
    )
    result = engine.rerank(
        ranked(rows),
        side_info(available=available),
        request(2, seen=seen, exclude=exclude),
        8,
        explain=True,
    )
    assert items_of(result, 0) == [0, 2, 4]
    assert items_of(result, 1) == [4, 3, 1, 0]
    assert result.item_idx[1, 4:].tolist() == [-1] * 4
    assert np.isneginf(result.scores[1, 4:]).all()
    assert result.explanations is not None
    removed = {
        report.rule: [(a.item, a.reason) for a in report.of_kind("removed")]
        for report in result.explanations[0].rules
    }
    records = json.loads(json.dumps(result.explanations[0].to_list()))
    assert records[0]["actions"] == [
        {"kind": "removed", "item": 1, "from": 1, "to": -1, "reason": "seen"}
    ]
    assert removed == {
        "filter_seen": [(1, "seen")],
        "filter_excluded": [(3, "excluded by the request")],
        "filter_unavailable": [(5, "unavailable")],
        "filter_blocked": [(6, "blocked"), (7, "blocked")],
    }


@st.composite
def filter_cases(
    draw: st.DrawFn,
) -> tuple[list[list[int]], list[list[int]], list[list[int]], list[bool], list[int]]:
    n = draw(st.integers(1, 4))
    universe = st.integers(0, N_ITEMS - 1)
    rows = [draw(st.lists(universe, max_size=15, unique=True)) for _ in range(n)]
    seen = [draw(st.lists(universe, max_size=10)) for _ in range(n)]
    exclude = [draw(st.lists(universe, max_size=5)) for _ in range(n)]
    available = draw(st.lists(st.booleans(), min_size=N_ITEMS, max_size=N_ITEMS))
    blocked = draw(st.lists(universe, max_size=5))
    return rows, seen, exclude, available, blocked


@PROPERTY
@given(filter_cases())
def test_filters_keep_everything_else_in_order(
    case: tuple[list[list[int]], list[list[int]], list[list[int]], list[bool], list[int]],
) -> None:
    rows, seen, exclude, available, blocked = case
    engine = RuleEngine(item_ids=ITEM_IDS, blocked_items=blocked)  # default rules: the filters
    req = request(len(rows), seen=[np.array(s, dtype=np.int64) for s in seen], exclude=exclude)
    result = engine.rerank(ranked(rows), side_info(available=available), req, 15)
    for u, row in enumerate(rows):
        gone = set(seen[u]) | set(exclude[u]) | set(blocked)
        gone |= {i for i in range(N_ITEMS) if not available[i]}
        assert items_of(result, u) == [i for i in row if i not in gone]


# ------------------------------------------------------------------------------ category cap


def test_category_cap_pushes_items_down_not_out() -> None:
    categories = [0, 0, 0, 1, 1, 2, -1, -1]  # items 6 and 7 have no category: never capped
    engine = reranker(CategoryCapConfig(max_per_category=2))
    rows = [[0, 1, 2, 6, 7, 3, 4, 5]]
    result = engine.rerank(ranked(rows), side_info(categories), request(1), 8, explain=True)
    assert items_of(result) == [0, 1, 6, 7, 3, 4, 5, 2]
    assert result.explanations is not None
    (report,) = result.explanations[0].rules
    assert [(a.item, a.from_position, a.to_position) for a in report.of_kind("capped")] == [
        (2, 2, 7)
    ]
    # With k = 4 the cap only concerns the top 4: nothing of category 0 beyond two of them.
    top4 = engine.rerank(ranked(rows), side_info(categories), request(1), 4)
    assert items_of(top4) == [0, 1, 6, 7]
    # Not enough other items to fill k: the capped items fill the rest instead of leaving holes.
    short = engine.rerank(ranked([[0, 1, 2, 3]]), side_info(categories), request(1), 4)
    assert items_of(short) == [0, 1, 3, 2]


@PROPERTY
@given(
    rows=st.lists(
        st.lists(st.integers(0, N_ITEMS - 1), max_size=20, unique=True), min_size=1, max_size=3
    ),
    categories=st.lists(st.integers(-1, 3), min_size=N_ITEMS, max_size=N_ITEMS),
    cap=st.integers(1, 3),
    k=st.integers(1, 12),
)
def test_category_cap_holds_whenever_enough_items_exist(
    rows: list[list[int]], categories: list[int], cap: int, k: int
) -> None:
    engine = reranker(CategoryCapConfig(max_per_category=cap))
    result = engine.rerank(ranked(rows), side_info(categories), request(len(rows)), k)
    full = engine.rerank(ranked(rows), side_info(categories), request(len(rows)), N_ITEMS)
    for u, row in enumerate(rows):
        assert sorted(items_of(full, u)) == sorted(row), "the cap reorders, it does not delete"
        counts = np.bincount([categories[i] for i in row if categories[i] >= 0], minlength=4)
        room = np.minimum(counts, cap).sum() + sum(categories[i] < 0 for i in row)
        if room >= min(k, len(row)):
            top = [categories[i] for i in items_of(result, u) if categories[i] >= 0]
            assert np.bincount(top, minlength=4).max(initial=0) <= cap


# ------------------------------------------------------------------------------ MMR


@PROPERTY
@given(
    rows=st.lists(
        st.lists(st.integers(0, N_ITEMS - 1), max_size=20, unique=True), min_size=1, max_size=3
    ),
    categories=st.lists(st.integers(-1, 3), min_size=N_ITEMS, max_size=N_ITEMS),
    k=st.integers(1, 12),
    use_embeddings=st.booleans(),
)
def test_mmr_with_lambda_one_keeps_the_score_order(
    rows: list[list[int]], categories: list[int], k: int, use_embeddings: bool
) -> None:
    embeddings = np.random.default_rng(0).normal(size=(N_ITEMS, 4)).astype(np.float32)
    info = side_info(categories, embeddings=embeddings if use_embeddings else None)
    engine = reranker(MMRConfig(relevance_weight=1.0, n_candidates=8))
    result = engine.rerank(ranked(rows), info, request(len(rows)), k)
    for u, row in enumerate(rows):
        assert items_of(result, u) == row[:k]


def test_mmr_with_lambda_zero_maximises_category_diversity() -> None:
    categories = [0, 0, 1, 1, 2]
    engine = reranker(MMRConfig(relevance_weight=0.0))
    result = engine.rerank(ranked([[0, 1, 2, 3, 4]]), side_info(categories), request(1), 3)
    assert items_of(result) == [0, 2, 4]  # one of each category; then the rest in order
    full = engine.rerank(ranked([[0, 1, 2, 3, 4]]), side_info(categories), request(1), 5)
    assert items_of(full) == [0, 2, 4, 1, 3]


def test_mmr_with_embeddings_skips_a_near_duplicate() -> None:
    embeddings = np.zeros((N_ITEMS, 2), dtype=np.float32)
    embeddings[0], embeddings[1], embeddings[2] = [1, 0], [1, 0.01], [0, 1]
    # relevance (min-max) = 1, 0.9, 0; with w = 0.5, after item 0: item 1 gains
    # 0.5 * 0.9 - 0.5 * ~1 < 0, item 2 gains 0.5 * 0 - 0.5 * 0 = 0.
    scores = [[1.0, 0.95, 0.5]]
    engine = reranker(MMRConfig(relevance_weight=0.5, similarity="embedding"))
    info = side_info(embeddings=embeddings)
    result = engine.rerank(ranked([[0, 1, 2]], scores), info, request(1), 3)
    assert items_of(result) == [0, 2, 1]
    assert result.scores[0].tolist() == pytest.approx([1.0, 0.5, 0.95])  # scores travel along
    with pytest.raises(DataError, match="embedding"):
        engine.rerank(ranked([[0, 1, 2]], scores), side_info(), request(1), 3)


# ------------------------------------------------------------------------------ boosts


def test_freshness_boost_known_answer() -> None:
    # Scores spread over 1.0, so the bonus for a brand-new item is 0.2 * 1.0, decaying to 0 at
    # 10 days: item 2 (new) +0.2, item 3 (5 days) +0.1, item 0 (20 days) +0, item 1 unknown +0,
    # item 4 released after the request (clock skew) counts as new: +0.2.
    created = [NOW - 20 * DAY, UNKNOWN_TIME, NOW, NOW - 5 * DAY, NOW + DAY]
    engine = reranker(FreshnessBoostConfig(max_age_days=10.0, bonus=0.2))
    scores = [[1.0, 0.9, 0.85, 0.0, 0.5]]
    result = engine.rerank(
        ranked([[0, 1, 2, 3, 4]], scores), side_info(created_at=created), request(1), 5
    )
    assert items_of(result) == [2, 0, 1, 4, 3]
    assert result.scores[0].tolist() == pytest.approx([1.05, 1.0, 0.9, 0.7, 0.1])


def test_boosts_multiply_and_add() -> None:
    categories = [0, 1, 1, 0]
    rows, scores = [[0, 1, 2, 3]], [[2.0, 1.0, -1.0, -2.0]]
    multiply = reranker(BoostConfig(items={item_id(2): 3.0}, categories={"c0": 0.5}))
    # item 0: 2 * 0.5 = 1; item 2: -1 + 2 * |-1| = 1 (a factor > 1 lifts a negative score);
    # item 3: -2 - 0.5 * 2 = -3.
    result = multiply.rerank(ranked(rows, scores), side_info(categories), request(1), 4)
    assert items_of(result) == [0, 1, 2, 3]  # ties (1.0) keep the earlier position
    assert result.scores[0].tolist() == pytest.approx([1.0, 1.0, 1.0, -3.0])
    add = reranker(BoostConfig(items={item_id(3): 5.0}, categories={"c1": -2.5}, mode="add"))
    result = add.rerank(ranked(rows, scores), side_info(categories), request(1), 4)
    assert items_of(result) == [3, 0, 1, 2]
    assert result.scores[0].tolist() == pytest.approx([3.0, 2.0, -1.5, -3.5])


# ------------------------------------------------------------------------------ exploration


def test_exploration_fills_exactly_the_reserved_positions_from_below_k() -> None:
    n, m, k = 5, 40, 10
    rows = [list(np.random.default_rng(u).permutation(N_ITEMS)[:m]) for u in range(n)]
    engine = reranker(ExplorationConfig(positions=(2, 5), pool_size=20))
    result = engine.rerank(ranked(rows), side_info(), request(n), k, explain=True)
    assert result.explanations is not None
    for u, row in enumerate(rows):
        assert np.flatnonzero(result.explored[u]).tolist() == [2, 5]
        out = items_of(result, u)
        drawn = [out[2], out[5]]
        assert set(drawn) <= set(row[k : k + 20]), "drawn from the pool below the slate"
        assert [i for i in out if i not in drawn] == row[:8], "the rest keeps its order"
        (report,) = result.explanations[u].rules
        explored = report.of_kind("explored")
        assert [(a.item, a.to_position) for a in explored] == [(out[2], 2), (out[5], 5)]


def test_exploration_is_deterministic_per_seed_user_and_request() -> None:
    rows = [list(range(N_ITEMS))] * 3
    info = side_info()
    for sampling in ("uniform", "score"):
        engine = reranker(ExplorationConfig(positions=(0, 3), pool_size=30, sampling=sampling))

        def draw(
            seed: int, users: list[int], requests: list[int], engine: RuleEngine = engine
        ) -> np.ndarray:
            req = RerankRequest(
                np.full(3, NOW),
                user_keys=np.array(users),
                request_keys=np.array(requests),
                seed=seed,
            )
            return engine.rerank(ranked(rows), info, req, 5).item_idx

        first = draw(7, [1, 2, 1], [0, 0, 0])
        assert np.array_equal(first, draw(7, [1, 2, 1], [0, 0, 0]))
        assert np.array_equal(first[0], first[2]), "same (seed, user, request): same items"
        assert not np.array_equal(first[0], first[1]), "another user"
        assert not np.array_equal(first[0], draw(8, [1, 2, 1], [0, 0, 0])[0]), "another seed"
        assert not np.array_equal(first[0], draw(7, [1, 2, 1], [5, 0, 0])[0]), "another request"


def test_exploration_only_fills_what_it_can() -> None:
    engine = reranker(ExplorationConfig(positions=(1, 2, 3)))
    # Two items below k = 4: two slots filled (the first two), one left as it was.
    result = engine.rerank(ranked([list(range(6))]), side_info(), request(1), 4)
    assert result.explored[0].tolist() == [False, True, True, False]
    assert sorted(items_of(result)) == [0, 1, 4, 5]
    # Nothing below k: nothing to explore.
    short = engine.rerank(ranked([[0, 1, 2]]), side_info(), request(1), 4)
    assert items_of(short) == [0, 1, 2] and not short.explored.any()
    with pytest.raises(DataError, match="user_keys"):
        engine.rerank(ranked([list(range(6))]), side_info(), RerankRequest(np.array([NOW])), 4)


# ------------------------------------------------------------------------------ pins


def test_pins_land_on_their_positions_and_later_rules_leave_them() -> None:
    engine = reranker(
        PinsConfig({item_id(8): 0, item_id(5): 3, item_id(30): 1}),
        BoostConfig(items={item_id(9): 100.0}),
    )
    result = engine.rerank(ranked([list(range(10))]), side_info(), request(1), 6)
    # item 30 is not a candidate and insert_if_absent is off: not shown. Item 9's boost moves it
    # to the first free position, around the pins.
    assert items_of(result) == [8, 9, 0, 5, 1, 2]
    assert result.pinned[0].tolist() == [True, False, False, True, False, False]


def test_pins_insert_only_when_configured_and_never_a_removed_item() -> None:
    pins = {item_id(30): 1, item_id(2): 0}
    seen = [np.array([2])]
    rows = ranked([[0, 1, 2, 3]])
    off = reranker(FilterSeenConfig(), PinsConfig(pins))
    assert items_of(off.rerank(rows, side_info(), request(1, seen=seen), 3)) == [0, 1, 3]
    on = reranker(FilterSeenConfig(), PinsConfig(pins, insert_if_absent=True))
    result = on.rerank(rows, side_info(), request(1, seen=seen), 3, explain=True)
    assert items_of(result) == [0, 30, 1]  # 30 inserted; 2 was seen, so not put back
    assert np.isnan(result.scores[0, 1])
    assert result.explanations is not None
    pins_report = result.explanations[0].rules[1]
    skipped = pins_report.of_kind("skipped")
    assert [(a.item, a.reason) for a in skipped] == [(2, "removed by an earlier rule")]
    assert [(a.item, a.from_position, a.to_position) for a in pins_report.of_kind("pinned")] == [
        (30, -1, 1)
    ]


def test_a_pin_loses_to_an_earlier_lock_and_past_k() -> None:
    engine = reranker(ExplorationConfig(positions=(1,)), PinsConfig({item_id(0): 1, item_id(1): 7}))
    result = engine.rerank(ranked([list(range(10))]), side_info(), request(1), 4, explain=True)
    assert result.explored[0, 1] and not result.pinned.any()
    assert result.explanations is not None
    reasons = [a.reason for a in result.explanations[0].rules[1].of_kind("skipped")]
    assert reasons == ["position 1 is already taken", "pin position 7 is past k=4"]


# ------------------------------------------------------------------------------ engine-wide


@st.composite
def rule_lists(draw: st.DrawFn, exploration: bool = True) -> tuple[RuleConfig, ...]:
    ids = st.integers(0, N_ITEMS - 1).map(item_id)
    makers: list[st.SearchStrategy[RuleConfig]] = [
        st.just(FilterSeenConfig()),
        st.just(FilterExcludedConfig()),
        st.just(FilterUnavailableConfig()),
        st.lists(ids, max_size=4).map(lambda x: FilterBlockedConfig(tuple(x))),
        st.integers(1, 3).map(CategoryCapConfig),
        st.builds(
            MMRConfig,
            relevance_weight=st.floats(0, 1),
            n_candidates=st.integers(1, 30),
            similarity=st.sampled_from(["auto", "category", "embedding"]),
        ),
        st.builds(FreshnessBoostConfig, st.floats(0.5, 30), st.floats(-1, 1)),
        st.builds(
            BoostConfig,
            items=st.dictionaries(ids, st.floats(0.1, 5), max_size=3),
            categories=st.dictionaries(
                st.sampled_from(CATEGORY_NAMES), st.floats(0.1, 5), max_size=2
            ),
        ),
        st.builds(
            PinsConfig,
            items=st.dictionaries(ids, st.integers(0, 12), max_size=3).filter(
                lambda d: len(set(d.values())) == len(d)
            ),
            insert_if_absent=st.booleans(),
        ),
    ]
    if exploration:
        makers.append(
            st.builds(
                ExplorationConfig,
                positions=st.lists(st.integers(0, 8), max_size=3, unique=True).map(tuple),
                pool_size=st.integers(1, 20),
                sampling=st.sampled_from(["uniform", "score"]),
            )
        )
    return tuple(draw(st.lists(st.one_of(makers), max_size=6)))


@st.composite
def worlds(draw: st.DrawFn) -> tuple[RankedList, ItemSideInfo, RerankRequest]:
    n = draw(st.integers(1, 4))
    m = draw(st.integers(0, 25))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    items = np.full((n, m), -1, dtype=np.int32)
    scores = np.full((n, m), -np.inf, dtype=np.float32)
    for u in range(n):
        length = draw(st.integers(0, m))
        # Repeats in the input are allowed: the engine drops them.
        items[u, :length] = rng.integers(0, N_ITEMS, size=length)
        scores[u, :length] = np.sort(rng.normal(size=length))[::-1]
    info = side_info(
        categories=rng.integers(-1, N_CATEGORIES, size=N_ITEMS).tolist(),
        created_at=(NOW - rng.integers(0, 20 * DAY, size=N_ITEMS)).tolist(),
        available=(rng.random(N_ITEMS) > 0.1).tolist(),
        embeddings=rng.normal(size=(N_ITEMS, 3)).astype(np.float32),
    )
    req = RerankRequest(
        np.full(n, NOW, dtype=np.int64),
        seen=[rng.integers(0, N_ITEMS, size=3) for _ in range(n)],
        exclude=[rng.integers(0, N_ITEMS, size=1) for _ in range(n)],
        user_keys=rng.integers(-(2**40), 2**40, size=n),
        seed=draw(st.integers(0, 100)),
    )
    return RankedList(items, scores), info, req


@PROPERTY
@given(rules=rule_lists(), world=worlds(), k=st.integers(0, 15))
def test_output_is_a_duplicate_free_subset_of_the_input(
    rules: tuple[RuleConfig, ...],
    world: tuple[RankedList, ItemSideInfo, RerankRequest],
    k: int,
) -> None:
    ranked_lists, info, req = world
    result = reranker(*rules).rerank(ranked_lists, info, req, k)
    assert result.item_idx.shape == result.scores.shape == (len(req), k)
    insertable = {
        ITEM_IDS.index([item])[0]
        for r in rules
        if isinstance(r, PinsConfig) and r.insert_if_absent
        for item in r.items
    }
    for u in range(len(req)):
        row = result.item_idx[u]
        out = items_of(result, u)
        assert (row[len(out) :] == -1).all(), "padding only at the end"
        assert len(out) == len(set(out)), "no duplicates"
        assert set(out) - set(ranked_lists.item_idx[u].tolist()) <= insertable
        assert not set(out) & _forbidden(rules, info, req, u), "a filter always wins"
        assert not (result.explored[u] & result.pinned[u]).any()


def _forbidden(
    rules: tuple[RuleConfig, ...], info: ItemSideInfo, req: RerankRequest, row: int
) -> set[int]:
    """The items the configured filters forbid for one user (pinned or not)."""
    forbidden: set[int] = set()
    for rule in rules:
        if isinstance(rule, FilterSeenConfig):
            forbidden |= set(np.asarray(req.seen[row]).tolist())  # type: ignore[index]
        elif isinstance(rule, FilterExcludedConfig):
            forbidden |= set(np.asarray(req.exclude[row]).tolist())  # type: ignore[index]
        elif isinstance(rule, FilterUnavailableConfig) and info.available is not None:
            forbidden |= set(np.flatnonzero(~info.available).tolist())
        elif isinstance(rule, FilterBlockedConfig):
            forbidden |= {int(i) for i in ITEM_IDS.index(list(rule.item_ids))}
    return forbidden


@PROPERTY
@given(rules=rule_lists(), world=worlds(), k=st.integers(0, 15))
def test_a_row_alone_equals_that_row_in_a_batch(
    rules: tuple[RuleConfig, ...],
    world: tuple[RankedList, ItemSideInfo, RerankRequest],
    k: int,
) -> None:
    ranked_lists, info, req = world
    engine = reranker(*rules)
    batch = engine.rerank(ranked_lists, info, req, k, explain=True)
    assert batch.explanations is not None
    for u in range(len(req)):
        alone = engine.rerank(
            RankedList(ranked_lists.item_idx[[u]], ranked_lists.scores[[u]]),
            info,
            req.take([u]),
            k,
            explain=True,
        )
        np.testing.assert_array_equal(alone.item_idx[0], batch.item_idx[u])
        np.testing.assert_array_equal(alone.scores[0], batch.scores[u])
        np.testing.assert_array_equal(alone.explored[0], batch.explored[u])
        np.testing.assert_array_equal(alone.pinned[0], batch.pinned[u])
        assert alone.explanations is not None
        assert alone.explanations[0] == batch.explanations[u]


def _replay(before: list[int], report: RuleReport) -> list[int]:
    """Apply a report's actions to the list before the rule (see RuleReport's docstring)."""
    removed = {a.item for a in report.of_kind("removed")}
    placed = report.of_kind("moved", "inserted", "explored", "pinned")
    taken_out = {a.item for a in placed}
    replayed = [i for i in before if i not in removed and i not in taken_out]
    for action in sorted(placed, key=lambda a: a.to_position):
        replayed.insert(action.to_position, action.item)
    return replayed


@PROPERTY
@given(rules=rule_lists(exploration=False), world=worlds())
def test_explanations_account_for_every_removal_and_move(
    rules: tuple[RuleConfig, ...], world: tuple[RankedList, ItemSideInfo, RerankRequest]
) -> None:
    ranked_lists, info, req = world
    k = ranked_lists.item_idx.shape[1] + 5  # wide enough to see whole lists (pins may insert)
    result = reranker(*rules).rerank(ranked_lists, info, req, k, explain=True)
    assert result.explanations is not None
    for u in range(len(req)):
        reports = list(result.explanations[u].rules)
        if reports and reports[0].step == INPUT_STEP:
            reports = reports[1:]
        assert [r.rule for r in reports] == [rule.name for rule in rules], "every rule, in order"
        by_score = np.argsort(-ranked_lists.scores[u], kind="stable")
        row = ranked_lists.item_idx[u, by_score].tolist()
        before = list(dict.fromkeys(i for i in row if i >= 0))  # score order, repeats dropped
        for step, report in enumerate(reports):
            partial = reranker(*rules[: step + 1]).rerank(ranked_lists, info, req, k)
            after = items_of(partial, u)
            assert _replay(before, report) == after
            assert {a.item for a in report.of_kind("removed")} == set(before) - set(after)
            before = after


# ------------------------------------------------------------------------------ fallback


# The pipeline's re-ranking fallback (pipeline.funnel.top_k_minus_blocked) takes merged
# candidates, which hold an item at most once per row, and the seen items as a CSR matrix.


def test_fallback_removes_seen_items_and_keeps_the_order() -> None:
    items = np.array([[5, 3, 9, 1, -1, -1], [2, 4, -1, -1, -1, -1]], dtype=np.int32)
    scores = np.array([[9, 8, 7, 5, -np.inf, -np.inf], [2, 1] + [-np.inf] * 4], dtype=np.float32)
    seen = sp.csr_matrix(([1.0, 1.0], ([0, 1], [9, 4])), shape=(2, 10))
    result, result_scores = top_k_minus_blocked(items, scores, seen, 3)
    assert result.tolist() == [[5, 3, 1], [2, -1, -1]]
    assert result_scores[0].tolist() == [9, 8, 5]
    seen_5 = sp.csr_matrix(([1.0], ([0], [5])), shape=(2, 10))
    wide, _ = top_k_minus_blocked(items, scores, seen_5, 8)
    assert wide.tolist() == [[3, 9, 1, -1, -1, -1, -1, -1], [2, 4] + [-1] * 6]


def test_fallback_of_a_batch_without_candidates_is_padding() -> None:
    seen = sp.csr_matrix(([1.0], ([0], [4])), shape=(2, 10))
    for width in (0, 3):
        items = np.full((2, width), -1, dtype=np.int32)
        scores = np.full((2, width), -np.inf, dtype=np.float32)
        out, out_scores = top_k_minus_blocked(items, scores, seen, 2)
        assert out.tolist() == [[-1, -1], [-1, -1]]
        assert np.isneginf(out_scores).all()


@PROPERTY
@given(world=worlds(), k=st.integers(0, 15))
def test_fallback_equals_the_seen_filter(
    world: tuple[RankedList, ItemSideInfo, RerankRequest], k: int
) -> None:
    ranked_lists, info, req = world
    items = ranked_lists.item_idx.copy()
    for row in items:  # repeats become padding, as merged candidates have none
        _, first = np.unique(row, return_index=True)
        repeat = np.ones(row.size, dtype=bool)
        repeat[first] = False
        row[repeat] = -1
    distinct = RankedList(items, ranked_lists.scores)
    assert isinstance(req.seen, list)  # worlds() give per-row lists
    lists = [np.asarray(s) for s in req.seen]
    seen = sp.csr_matrix(
        (
            np.ones(sum(s.size for s in lists)),
            (np.repeat(np.arange(len(lists)), [s.size for s in lists]), np.concatenate(lists)),
        ),
        shape=(len(lists), N_ITEMS),
    )
    expected = reranker(FilterSeenConfig()).rerank(distinct, info, req, k)
    got_items, got_scores = top_k_minus_blocked(items, ranked_lists.scores, seen, k)
    np.testing.assert_array_equal(got_items, expected.item_idx)
    np.testing.assert_array_equal(got_scores, expected.scores)


# ------------------------------------------------------------------------------ bad input


def test_rows_are_put_in_score_order_first_and_repeats_dropped() -> None:
    rows = ranked([[4, 7, 4, 1, 2]], [[0.1, 0.9, 0.5, 0.3, 0.9]])
    result = reranker().rerank(rows, side_info(), request(1), 5, explain=True)
    assert items_of(result) == [7, 2, 4, 1]  # ties keep input order; the better 4 stays
    assert result.scores[0, :4].tolist() == pytest.approx([0.9, 0.9, 0.5, 0.3])
    assert result.explanations is not None
    (report,) = result.explanations[0].rules
    assert report.step == INPUT_STEP
    assert [(a.item, a.reason) for a in report.of_kind("removed")] == [(4, "duplicate")]


def test_bad_input_is_a_data_error_that_names_it() -> None:
    engine = reranker()
    with pytest.raises(DataError, match=r"outside \[-1, 40\)"):
        engine.rerank(ranked([[0, 40]]), side_info(), request(1), 2)
    with pytest.raises(DataError, match="non-finite"):
        engine.rerank(ranked([[0, 1]], [[1.0, np.nan]]), side_info(), request(1), 2)
    with pytest.raises(DataError, match="2 requests for 1"):
        engine.rerank(ranked([[0, 1]]), side_info(), request(2), 2)
    with pytest.raises(DataError, match="k must be"):
        engine.rerank(ranked([[0, 1]]), side_info(), request(1), -1)
    with pytest.raises(DataError, match="seen has 2 item lists for 1"):
        request(1, seen=[[1], [2]])


# ------------------------------------------------------------------------------ plumbing


def test_catalog_side_info_and_names() -> None:
    frame = pl.DataFrame(
        {
            "item_id": [item_id(i) for i in range(4)],
            "categories": ["rock|pop", "jazz", "", "rock"],
            "created_at": [NOW, NOW, NOW, NOW - 30 * DAY],
        }
    )
    catalog = ItemCatalog.from_frame(frame, IdMap.from_ids([item_id(i) for i in range(4)]))
    info = ItemSideInfo.from_catalog(catalog, available=[True, True, True, False])
    engine = RuleEngine.for_catalog(
        RerankerConfig((FilterUnavailableConfig(), BoostConfig(categories={"jazz": 10.0}))),
        catalog,
    )
    result = engine.rerank(ranked([[0, 1, 2, 3]]), info, request(1), 4)
    assert items_of(result) == [1, 0, 2]  # jazz boosted to the top, item 3 unavailable


def test_request_take_keeps_sparse_rows() -> None:
    seen = sp.csr_matrix(([1.0, 1.0], ([0, 1], [1, 2])), shape=(2, N_ITEMS))
    req = request(2, seen=seen)
    engine = reranker(FilterSeenConfig())
    rows = ranked([[0, 1, 2], [0, 1, 2]])
    batch = engine.rerank(rows, side_info(), req, 3)
    alone = engine.rerank(
        RankedList(rows.item_idx[[1]], rows.scores[[1]]), side_info(), req.take([1]), 3
    )
    assert items_of(batch, 1) == items_of(alone) == [0, 1]


@PROPERTY
@given(st.permutations(range(12)))
def test_moves_are_the_fewest_that_explain_a_reordering(values: list[int]) -> None:
    mask = _in_longest_increasing(np.array(values))
    kept = np.array(values)[mask]
    assert (np.diff(kept) > 0).all()
    # O(n^2) longest increasing subsequence, for reference.
    best = [1] * len(values)
    for i in range(len(values)):
        for j in range(i):
            if values[j] < values[i]:
                best[i] = max(best[i], best[j] + 1)
    assert mask.sum() == max(best, default=0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 5), w=st.integers(0, 12))
def test_per_row_mask_reads_csr_coo_and_lists_alike(seed: int, n: int, w: int) -> None:
    """Membership from a CSR (read from its arrays), a COO and plain per-row lists agree, and
    equals a direct per-row set lookup."""
    rng = np.random.default_rng(seed)
    items = rng.integers(-1, 15, size=(n, w))
    lists = [rng.choice(15, size=rng.integers(0, 6), replace=False) for _ in range(n)]
    rows = np.repeat(np.arange(n), [len(a) for a in lists])
    cols = np.concatenate(lists) if rows.size else np.zeros(0, np.int64)
    csr = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, 15))
    expected = np.array(
        [[item >= 0 and item in set(lists[r]) for item in items[r]] for r in range(n)], bool
    ).reshape(n, w)
    for per_row in (csr, csr.tocoo(), lists):
        np.testing.assert_array_equal(per_row_mask(items, per_row), expected)
