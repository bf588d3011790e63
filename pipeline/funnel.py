"""The ``Pipeline``: user state -> retrieval -> ranking -> re-ranking, a latency budget per stage.

One object serves the HTTP service, batch recommendation / offline evaluation and the A/B
simulator: nothing is re-implemented elsewhere. It is plain Python (no web framework inside) and
batch-first: a single HTTP request is a batch of one.

Degradation, not failure: a stage that raises, or that has not finished within its budget, is
replaced by its fallback and the response says so in ``degraded``:

    retrieval -> trending / popular items (precomputed, microseconds)
    ranking   -> the retrieval (merge) order
    reranking -> the ranked top-k minus already-seen items

Budgets are deadlines, enforced in one of two ways (``BudgetConfig.preemptive``):

- cooperative (the default): the stage runs on the calling thread and the deadline is checked
  where the stage can stop (retrieval between its sources) and when it returns; a stage past its
  deadline is replaced by its fallback. Production services enforce in-process deadlines this
  way (gRPC deadlines, Go contexts): a thread cannot be stopped safely, only asked to stop. It
  costs nothing, but a stage stuck inside one step holds its request until the step returns.
- preemptive: the stage runs in a worker thread and the caller waits at most its budget, so a
  stuck stage cannot hold the answer (its late result is discarded). The price is two thread
  handoffs per stage, each of which may wake a halted vCPU: on the 2-vCPU reference VM a request
  cost 0.3-3.8 ms more, depending on the host's moment (docs/benchmarks.md). Choose it when a
  stage can block, e.g. a retrieval source that calls another service.

Offline callers (evaluation, simulation) pass ``enforce_budgets=False``: every stage runs to the
end, so results do not depend on the machine's speed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from data.errors import ConfigError
from pipeline.artifacts import Artifacts
from pipeline.online_state import OnlineState
from retrieval.base import PAD_ITEM, Candidates, UserBatch
from retrieval.merge import MergedCandidates, merge_candidates, merge_order_scores
from retrieval.stage import RetrievalAbandonedError, RetrievalStage

logger = logging.getLogger(__name__)

T = TypeVar("T")
STAGES = ("retrieval", "ranking", "reranking")
# Sources that can answer for anyone in microseconds: the retrieval fallback, in preference order.
FALLBACK_SOURCES = ("popular", "coldstart")


@dataclass(frozen=True)
class BudgetConfig:
    """Per-stage latency budgets in milliseconds (the usual production ranges are 10-20 / 20-50 /
    5-10 ms; our defaults sit at the low end because the whole response should stay under ~35 ms).
    """

    retrieval_ms: float = 10.0
    ranking_ms: float = 20.0
    reranking_ms: float = 5.0
    # Run each stage in a worker thread and stop waiting at its deadline (see the module
    # docstring); False checks the deadline on the calling thread.
    preemptive: bool = False
    # Worker threads that run stages when preemptive; 2 matches the 2-core reference machine.
    workers: int = 2
    # A call answering n requests at once (dynamic batching) gets each budget times
    # 1 + batch_growth * (n - 1): the batch shares the fixed cost, so every request's share of
    # the time is below what it would get alone (0.5: a batch of 2 gets 1.5x, 0.75x each).
    batch_growth: float = 0.5

    def __post_init__(self) -> None:
        for name in ("retrieval_ms", "ranking_ms", "reranking_ms"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"[pipeline] {name} must be positive, got {getattr(self, name)}")
        if not isinstance(self.preemptive, bool):
            raise ConfigError(
                f"[pipeline] preemptive must be true or false, got {self.preemptive!r}"
            )
        if self.workers < 1:
            raise ConfigError(f"[pipeline] workers must be >= 1, got {self.workers}")
        if not 0 <= self.batch_growth <= 1:
            raise ConfigError(
                f"[pipeline] batch_growth must lie in [0, 1], got {self.batch_growth}"
            )

    def for_stage(self, stage: str, batch_size: int = 1) -> float:
        """The stage's budget in ms for one call answering ``batch_size`` requests."""
        base = float(getattr(self, f"{stage}_ms"))
        return base * (1 + self.batch_growth * (max(batch_size, 1) - 1))

    def for_call(self, batch_size: int = 1) -> float:
        """Every stage's budget in ms for one call answering ``batch_size`` requests: the
        longest such a call takes while its stages keep to their budgets."""
        return sum(self.for_stage(stage, batch_size) for stage in STAGES)


# The final items, their scores and, per request, what each rule did.
Reranked = tuple[npt.NDArray[np.int32], npt.NDArray[np.float32], list[list[dict[str, Any]]]]


class RankingStep(Protocol):
    """The ranking step (``ranking.stage.RankingStage``): scores merged candidates; (n, m)
    float32, higher is better, -inf at padding."""

    def warm(self) -> None:
        """Get ready to serve (called once, before traffic)."""

    def score(
        self,
        retrieval: RetrievalStage,
        users: UserBatch,
        merged: MergedCandidates,
        now: npt.NDArray[np.int64],
    ) -> npt.NDArray[np.float32]: ...


class RerankingStep(Protocol):
    """The re-ranking step (``pipeline.rules_adapter.RuleReranker``): turns ranked candidates
    into the final ``k`` items, recording what each rule did."""

    def rerank(
        self,
        item_idx: npt.NDArray[np.int32],
        scores: npt.NDArray[np.float32],
        *,
        k: int,
        seen: sp.csr_matrix,
        exclude: Sequence[npt.NDArray[np.int32]],
        now: npt.NDArray[np.int64],
        user_ids: Sequence[str],
        explain: bool = False,
    ) -> Reranked: ...


@dataclass(frozen=True)
class RecommendRequest:
    user_id: str
    k: int = 10
    exclude_item_ids: tuple[str, ...] = ()
    now: int | None = None  # seconds UTC; None = the wall clock
    explain: bool = False


@dataclass
class Recommendation:
    """One user's answer; ``sources[i]`` lists the sources that produced ``item_ids[i]``."""

    user_id: str
    item_ids: list[str]
    scores: list[float]
    sources: list[list[str]]
    model_version: str
    degraded: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    explanation: dict[str, Any] | None = None


class StageOverBudgetError(Exception):
    """A stage did not answer within its budget (the pipeline serves the stage's fallback)."""


class Pipeline:
    """Composes the stages of one bundle; see the module docstring."""

    def __init__(
        self,
        artifacts: Artifacts,
        state: OnlineState,
        *,
        ranker: RankingStep | None = None,
        reranker: RerankingStep | None = None,
        budgets: BudgetConfig | None = None,
        enforce_budgets: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.artifacts = artifacts
        self.state = state
        self.ranker = ranker
        self.reranker = reranker
        self.budgets = budgets if budgets is not None else BudgetConfig()
        self.enforce_budgets = enforce_budgets
        self.clock = clock
        self._executor = (
            ThreadPoolExecutor(self.budgets.workers, thread_name_prefix="pipeline-stage")
            if enforce_budgets and self.budgets.preemptive
            else None
        )

    @property
    def model_version(self) -> str:
        """The bundle's version, ``+online.<step>`` once online updates changed its weights."""
        step = self.artifacts.retrieval.online_step
        base = self.artifacts.model_version
        return base if step == 0 else f"{base}+online.{step}"

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def warm(self, *, batch_size: int = 4_096, requests: int = 32) -> int:
        """Get ready for traffic (start-up, before the first request); returns the users warmed.

        Precomputes per-user work for every user in the online state, then answers ``requests``
        single-user requests without budgets: a cold process spends ~1 s in its first requests
        (lazy initialisation in the libraries, first touches of memory-mapped pages), which
        would otherwise time out the first real requests.
        """
        if self.ranker is not None:
            self.ranker.warm()
        user_ids = self.state.user_ids()
        now = int(self.clock())
        for start in range(0, len(user_ids), batch_size):
            chunk = user_ids[start : start + batch_size]
            self.artifacts.retrieval.warm(self.state.batch(chunk, now))
        rehearsal = Pipeline(
            self.artifacts,
            self.state,
            ranker=self.ranker,
            reranker=self.reranker,
            enforce_budgets=False,
            clock=self.clock,
        )
        for user_id in user_ids[:requests]:
            rehearsal.recommend([RecommendRequest(user_id, k=10)])
        return len(user_ids)

    # ------------------------------------------------------------------------------- serving
    def recommend(self, requests: Sequence[RecommendRequest]) -> list[Recommendation]:
        """Answer a batch of requests (one funnel pass for the whole batch)."""
        if not requests:
            return []
        started = time.perf_counter()
        n = len(requests)
        now, users, seen, exclude, blocked = self._batch_state(requests)
        degraded: list[str] = []
        timings: dict[str, float] = {}

        # Retrieval checks its deadline between sources and stops there: cooperative, that ends
        # the stage; preemptive, the abandoned work stops instead of competing with later requests.
        deadline = time.perf_counter() + self.budgets.for_stage("retrieval", n) / 1000
        expired = (lambda: time.perf_counter() > deadline) if self.enforce_budgets else None
        merged = self._stage(
            "retrieval",
            lambda: self.artifacts.retrieval.retrieve(users, exclude=blocked, should_stop=expired),
            lambda: self._fallback_candidates(users, blocked),
            degraded,
            timings,
            n,
        )
        if self.ranker is not None:
            ranker = self.ranker
            scores = self._stage(
                "ranking",
                lambda: ranker.score(self.artifacts.retrieval, users, merged, now),
                lambda: merge_order_scores(merged.item_idx),
                degraded,
                timings,
                n,
            )
        else:
            scores = merge_order_scores(merged.item_idx)
            timings["ranking"] = 0.0
        order = np.argsort(-scores, axis=1, kind="stable")
        ranked_items = np.take_along_axis(merged.item_idx, order, axis=1)
        ranked_scores = np.take_along_axis(scores, order, axis=1)
        k_max = max(r.k for r in requests)

        no_notes: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        if self.reranker is not None:
            reranker = self.reranker

            def rerank() -> Reranked:
                return reranker.rerank(
                    ranked_items,
                    ranked_scores,
                    k=k_max,
                    seen=seen,
                    exclude=exclude,
                    now=now,
                    user_ids=[r.user_id for r in requests],
                    explain=any(r.explain for r in requests),
                )

            def unfiltered() -> Reranked:
                return (*top_k_minus_blocked(ranked_items, ranked_scores, blocked, k_max), no_notes)

            final_items, final_scores, explanations = self._stage(
                "reranking", rerank, unfiltered, degraded, timings, n
            )
        else:
            final_items, final_scores = top_k_minus_blocked(
                ranked_items, ranked_scores, blocked, k_max
            )
            explanations = no_notes
            timings["reranking"] = 0.0
        timings["total"] = (time.perf_counter() - started) * 1000
        return self._responses(
            requests, merged, order, final_items, final_scores, degraded, timings, explanations
        )

    def fallback(self, requests: Sequence[RecommendRequest], reason: str) -> list[Recommendation]:
        """Answer without the funnel: the retrieval fallback (popular / trending) minus what each
        user has seen or excluded, in its own order, with ``reason`` in ``degraded``.

        For a caller that cannot wait for :meth:`recommend` (the service's request deadline);
        it costs well under a millisecond and shares nothing with a running ``recommend`` but the
        read-only state.
        """
        if not requests:
            return []
        started = time.perf_counter()
        _, users, _, _, blocked = self._batch_state(requests)
        merged = self._fallback_candidates(users, blocked)
        order = np.broadcast_to(np.arange(merged.item_idx.shape[1]), merged.item_idx.shape)
        items, scores = top_k_minus_blocked(
            merged.item_idx,
            merge_order_scores(merged.item_idx),
            blocked,
            max(r.k for r in requests),
        )
        timings = dict.fromkeys(STAGES, 0.0)
        timings["total"] = (time.perf_counter() - started) * 1000
        notes: list[list[dict[str, Any]]] = [[] for _ in requests]
        return self._responses(requests, merged, order, items, scores, [reason], timings, notes)

    # ------------------------------------------------------------------------------ internals
    def _batch_state(
        self, requests: Sequence[RecommendRequest]
    ) -> tuple[
        npt.NDArray[np.int64],
        UserBatch,
        sp.csr_matrix,
        list[npt.NDArray[np.int32]],
        sp.csr_matrix,
    ]:
        """``(now, users, seen, exclude, blocked)`` of a batch: each request's time, the users'
        online state, the items they have seen, the items each request excludes, and both."""
        wall_now = int(self.clock())
        now = np.array([r.now if r.now is not None else wall_now for r in requests], dtype=np.int64)
        users = self.state.batch([r.user_id for r in requests], now)
        n_items = len(self.artifacts.items)
        seen = users.seen_matrix(n_items)
        exclude = [self._exclusions(r.exclude_item_ids) for r in requests]
        return now, users, seen, exclude, _add_rows(seen, exclude, n_items)

    def _stage(
        self,
        name: str,
        run: Callable[[], T],
        fallback: Callable[[], T],
        degraded: list[str],
        timings: dict[str, float],
        batch_size: int,
    ) -> T:
        """Run ``run`` within the stage budget for ``batch_size`` requests; on timeout or error,
        record it and use ``fallback``."""
        start = time.perf_counter()
        try:
            if self.enforce_budgets:
                result = self._within_budget(run, self.budgets.for_stage(name, batch_size) / 1000)
            else:
                result = run()
        except (StageOverBudgetError, RetrievalAbandonedError):  # the deadline passed either way
            degraded.append(f"{name}:timeout")
            result = fallback()
        except Exception:  # a failing stage degrades the answer, it never fails the request
            logger.exception("stage %s failed; serving its fallback", name)
            degraded.append(f"{name}:error")
            result = fallback()
        timings[name] = (time.perf_counter() - start) * 1000
        return result

    def _within_budget(self, run: Callable[[], T], budget_s: float) -> T:
        """``run()``, or :class:`StageOverBudgetError` if it cannot answer within ``budget_s``."""
        if self._executor is None:  # cooperative: a result that comes late is not used either
            start = time.perf_counter()
            result = run()
            if time.perf_counter() - start > budget_s:
                raise StageOverBudgetError
            return result
        future = self._executor.submit(run)
        try:
            return future.result(timeout=budget_s)
        except FutureTimeout:
            future.cancel()
            raise StageOverBudgetError from None

    def _fallback_candidates(self, users: UserBatch, blocked: sp.csr_matrix) -> MergedCandidates:
        stage = self.artifacts.retrieval
        name = next((s for s in FALLBACK_SOURCES if s in stage.sources_), None)
        k = stage.config.n_candidates
        if name is None:
            empty = Candidates.empty(len(users), k)
            return merge_candidates({"none": empty}, {"none": k}, k)
        # Every source keeps its (empty) provenance columns: the ranker then sees the feature
        # schema it was trained on and can still rank the fallback's candidates.
        results = {source: Candidates.empty(len(users), 0) for source in stage.sources_}
        results[name] = stage.sources_[name].retrieve(users, k, exclude=blocked)
        quotas = {source: k if source == name else 0 for source in stage.sources_}
        return merge_candidates(results, quotas, k)

    def _exclusions(self, item_ids: tuple[str, ...]) -> npt.NDArray[np.int32]:
        if not item_ids:
            return np.empty(0, dtype=np.int32)
        index = self.artifacts.items.index(list(item_ids), allow_unknown=True)
        return index[index >= 0]

    def _responses(
        self,
        requests: Sequence[RecommendRequest],
        merged: MergedCandidates,
        order: npt.NDArray[np.intp],
        items: npt.NDArray[np.int32],
        scores: npt.NDArray[np.float32],
        degraded: list[str],
        timings: dict[str, float],
        explanations: list[list[dict[str, Any]]],
    ) -> list[Recommendation]:
        """Per-request answers; the id mapping and provenance are computed once for the batch."""
        k = np.array([r.k for r in requests])[:, None]
        keep = (items != PAD_ITEM) & (np.arange(items.shape[1])[None, :] < k)
        rows, columns = np.nonzero(keep)
        chosen = items[rows, columns]
        ids = self.artifacts.items.id_list(chosen)
        sources = _source_lists(merged, rows, chosen)
        chosen_scores = scores[rows, columns].tolist()
        bounds = np.searchsorted(rows, np.arange(len(requests) + 1)).tolist()
        out = []
        for row, request in enumerate(requests):
            lo, hi = bounds[row], bounds[row + 1]
            out.append(
                Recommendation(
                    user_id=request.user_id,
                    item_ids=ids[lo:hi],
                    scores=chosen_scores[lo:hi],
                    sources=sources[lo:hi],
                    model_version=self.model_version,
                    degraded=list(degraded),
                    timings_ms=dict(timings),
                    explanation=self._explanation(merged, order, explanations, row, request)
                    if request.explain
                    else None,
                )
            )
        return out

    def _explanation(
        self,
        merged: MergedCandidates,
        order: npt.NDArray[np.intp],
        explanations: list[list[dict[str, Any]]],
        row: int,
        request: RecommendRequest,
    ) -> dict[str, Any]:
        ranked = merged.item_idx[row][order[row]][: max(request.k * 3, 10)]
        return {
            "candidates": int((merged.item_idx[row] >= 0).sum()),
            "sources": list(merged.sources),
            "ranked_top": self.artifacts.items.id_list(ranked[ranked >= 0]),
            "rules": explanations[row] if row < len(explanations) else [],
        }


def _source_lists(
    merged: MergedCandidates, rows: npt.NDArray[np.intp], chosen: npt.NDArray[np.int32]
) -> list[list[str]]:
    """For each (row, item) pair, the names of the sources that retrieved that item for that row.

    Vectorized over the batch: a sorted (row, item) key finds each item's merged column, and the
    sources' presence bits become one small integer per candidate. An item the re-ranker brought
    from outside the candidates (a pin, say) has no sources.
    """
    if chosen.size == 0:
        return []
    n, m = merged.item_idx.shape
    stride = np.int64(max(int(merged.item_idx.max(initial=0)), int(chosen.max())) + 2)
    keys = np.arange(n, dtype=np.int64)[:, None] * stride + (merged.item_idx.astype(np.int64) + 1)
    flat_order = np.argsort(keys, axis=None, kind="stable")
    sorted_keys = keys.reshape(-1)[flat_order]
    wanted = rows.astype(np.int64) * stride + (chosen.astype(np.int64) + 1)
    position = np.searchsorted(sorted_keys, wanted).clip(max=sorted_keys.size - 1)
    found = sorted_keys[position] == wanted
    bits = (merged.present.reshape(n * m, -1) << np.arange(len(merged.sources))).sum(axis=1)
    masks = np.where(found, bits[flat_order[position]], 0).tolist()
    names = {
        mask: [s for j, s in enumerate(merged.sources) if mask >> j & 1] for mask in set(masks)
    }
    return [list(names[mask]) for mask in masks]


def top_k_minus_blocked(
    item_idx: npt.NDArray[np.int32],
    scores: npt.NDArray[np.float32],
    blocked: sp.csr_matrix,
    k: int,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """The re-ranking fallback: the first ``k`` ranked items that are not blocked, order kept."""
    n, m = item_idx.shape
    rows = np.repeat(np.arange(n), m)
    flat = item_idx.reshape(-1)
    valid = flat != PAD_ITEM
    hit = np.zeros(flat.size, dtype=bool)
    if blocked.nnz and valid.any():  # scipy answers an empty fancy index with a sparse matrix
        hit[valid] = np.asarray(blocked[rows[valid], flat[valid]]).ravel() > 0
    keep = (valid & ~hit).reshape(n, m)
    position = np.cumsum(keep, axis=1) - 1
    take = keep & (position < k)
    out_items = np.full((n, k), PAD_ITEM, dtype=np.int32)
    out_scores = np.full((n, k), -np.inf, dtype=np.float32)
    r, c = np.nonzero(take)
    out_items[r, position[r, c]] = item_idx[r, c]
    out_scores[r, position[r, c]] = scores[r, c]
    return out_items, out_scores


def _add_rows(
    seen: sp.csr_matrix, extra: Sequence[npt.NDArray[np.int32]], n_items: int
) -> sp.csr_matrix:
    """``seen`` plus per-row extra items (request exclusions), as one binary CSR."""
    if not any(e.size for e in extra):
        return seen
    rows = np.concatenate([np.full(e.size, i) for i, e in enumerate(extra)])
    cols = np.concatenate(extra)
    more = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(len(extra), n_items)
    )
    combined = (seen + more).tocsr()
    combined.data[:] = 1.0
    return combined
