"""The funnel explorer: a web page at ``/`` and the JSON it reads, one user's whole funnel.

``GET /v1/explore/{user_id}`` answers, for one user at one instant: the recent history the models
read, each retrieval source's own top-k, how many candidates the merge kept (and from where), the
ranker's top scores (or the merge order when no ranker is attached), what every re-ranking rule
did, and the final list with its timings and degraded flags. It is a diagnostic view: the per-stage
lists come from a separate, unbudgeted pass through the same stage objects the pipeline uses, and
the final list, timings and rules come from the pipeline itself (``explain=True``), so what the page
calls "final" is exactly what ``POST /v1/recommend`` answers.

The page (``serving/static/``) is plain HTML + JS with no build step and nothing fetched from
outside, so it works offline and behind a firewall.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from data.catalog import ItemCatalog
from data.errors import ConfigError
from pipeline.funnel import Pipeline, Recommendation, RecommendRequest
from retrieval.base import PAD_ITEM, UserBatch
from retrieval.merge import MergedCandidates
from serving.schemas import MAX_K, ErrorOut, Id

STATIC_DIR = Path(__file__).parent / "static"
# The only files the page needs; served by name from a fixed list, so no path ever reaches disk.
ASSETS = {
    "explorer.js": "text/javascript; charset=utf-8",
    "explorer.css": "text/css; charset=utf-8",
}
# Ranking panel label when no ranker is attached (the pipeline then keeps the merge order).
MERGE_ORDER = "retrieval order"


@dataclass(frozen=True)
class ExplorerConfig:
    """sample_users: user ids ``/v1/explore/_users`` returns by default (a page's drop-down).
    max_sample_users: the most it returns (bounds the answer).
    ranked_shown: rows of the ranked list shown; 20 covers a page of final items plus the ones the
        re-ranking rules may pull up from just below.
    """

    sample_users: int = 20
    max_sample_users: int = 200
    ranked_shown: int = 20

    def __post_init__(self) -> None:
        if not 1 <= self.sample_users <= self.max_sample_users:
            raise ConfigError(
                f"[explorer] sample_users ({self.sample_users}) must lie in "
                f"1..max_sample_users ({self.max_sample_users})"
            )
        if self.ranked_shown < 1:
            raise ConfigError(f"[explorer] ranked_shown must be >= 1, got {self.ranked_shown}")


# ------------------------------------------------------------------------------ response models
class HistoryItemOut(BaseModel):
    item_id: str
    timestamp: int  # seconds UTC
    categories: list[str]


class FunnelItemOut(BaseModel):
    """An item at some stage; ``score`` is ``None`` where the stage gives none (or not finite)."""

    item_id: str
    rank: int  # 1-based, in this stage's list
    score: float | None
    sources: list[str] = Field(default_factory=list)
    categories: list[str] = Field(default_factory=list)


class SourceOut(BaseModel):
    name: str
    took_ms: float
    items: list[FunnelItemOut]
    error: str | None = None


class MergedOut(BaseModel):
    count: int  # candidates handed to the ranker
    capacity: int  # the configured funnel width (n_candidates)
    by_source: dict[str, int]  # merged candidates each source produced (overlaps count twice)
    error: str | None = None


class RankingOut(BaseModel):
    ranker: str  # the ranker's class name, or "retrieval order"
    items: list[FunnelItemOut]
    error: str | None = None


class RerankingOut(BaseModel):
    reranker: str | None  # the re-ranker's class name; None when none is attached
    rules: list[dict[str, Any]]  # explanation.rules, item indices resolved to ``item_id``


class ExploreOut(BaseModel):
    user_id: str
    known_user: bool  # in the bundle's training users (else: cold-start path)
    model_version: str
    now: int  # seconds UTC, the instant the funnel was evaluated at
    history: list[HistoryItemOut]  # most recent first
    sources: list[SourceOut]
    merged: MergedOut
    ranking: RankingOut
    reranking: RerankingOut
    final: list[FunnelItemOut]
    degraded: list[str]
    timings_ms: dict[str, float]


class UsersOut(BaseModel):
    user_ids: list[str]


# ------------------------------------------------------------------------------ the funnel
def explore(pipeline: Pipeline, user_id: str, k: int, *, ranked_shown: int = 20) -> ExploreOut:
    """One user's funnel at the pipeline's current clock (see the module docstring).

    ``k``: items per source list and in the final list. Never raises for a stage failure: a failed
    source or ranker is reported in its panel, as the pipeline reports it in ``degraded``.
    """
    artifacts = pipeline.artifacts
    now = int(pipeline.clock())
    users = pipeline.state.batch([user_id], now)
    n_items = len(artifacts.items)
    seen = users.seen_matrix(n_items)
    describe = _Describer(pipeline)

    sources = []
    for name, source in artifacts.retrieval.sources_.items():
        started = time.perf_counter()
        try:
            found = source.retrieve(users, k, exclude=seen)
        except Exception as exc:  # shown in the panel; the pipeline degrades the same way
            sources.append(
                SourceOut(name=name, took_ms=_ms_since(started), items=[], error=_err(exc))
            )
            continue
        sources.append(
            SourceOut(
                name=name,
                took_ms=_ms_since(started),
                items=describe.items(found.item_idx[0], found.scores[0]),
            )
        )

    capacity = artifacts.retrieval.config.n_candidates
    try:
        merged = artifacts.retrieval.retrieve(users, exclude=seen)
    except Exception as exc:  # the pipeline serves its retrieval fallback; show why
        merged_out = MergedOut(count=0, capacity=capacity, by_source={}, error=_err(exc))
        ranking = RankingOut(ranker=_ranker_name(pipeline), items=[], error="no merged candidates")
    else:
        valid = merged.item_idx[0] != PAD_ITEM
        present = merged.present[0]  # (m, n_sources) bool
        merged_out = MergedOut(
            count=int(valid.sum()),
            capacity=capacity,
            by_source={
                s: int(c) for s, c in zip(merged.sources, present[valid].sum(axis=0), strict=True)
            },
        )
        names = np.asarray(merged.sources, dtype=object)
        provenance = [names[hits].tolist() for hits in present]
        ranking = _ranking(pipeline, users, merged, provenance, ranked_shown, describe)

    answer = pipeline.recommend([RecommendRequest(user_id=user_id, k=k, now=now, explain=True)])[0]
    explanation = answer.explanation or {}
    return ExploreOut(
        user_id=user_id,
        known_user=bool(users.user_idx[0] >= 0),
        model_version=answer.model_version,
        now=now,
        history=describe.history(users),
        sources=sources,
        merged=merged_out,
        ranking=ranking,
        reranking=RerankingOut(
            reranker=None if pipeline.reranker is None else type(pipeline.reranker).__name__,
            rules=[describe.rule(rule) for rule in explanation.get("rules", [])],
        ),
        final=describe.final(answer),
        degraded=answer.degraded,
        timings_ms={name: round(float(ms), 3) for name, ms in answer.timings_ms.items()},
    )


def _ranking(
    pipeline: Pipeline,
    users: UserBatch,
    merged: MergedCandidates,
    provenance: list[list[str]],
    shown: int,
    describe: _Describer,
) -> RankingOut:
    """The top ``shown`` merged candidates by ranker score (merge order when no ranker)."""
    items = merged.item_idx[0]
    name = _ranker_name(pipeline)
    if pipeline.ranker is None:
        order = np.flatnonzero(items != PAD_ITEM)[:shown]
        return RankingOut(
            ranker=name, items=describe.items(items[order], None, [provenance[c] for c in order])
        )
    try:
        scores = pipeline.ranker.score(pipeline.artifacts.retrieval, users, merged, users.now)[0]
    except Exception as exc:  # the pipeline falls back to the merge order; say why here
        return RankingOut(ranker=name, items=[], error=_err(exc))
    scores = np.where(items != PAD_ITEM, scores, -np.inf)
    order = np.argsort(-scores, kind="stable")[:shown]
    order = order[items[order] != PAD_ITEM]
    return RankingOut(
        ranker=name,
        items=describe.items(items[order], scores[order], [provenance[c] for c in order]),
    )


class _Describer:
    """Turns item indices into what the page shows (ids, categories), for one pipeline."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.items_map = pipeline.artifacts.items
        self.catalog: ItemCatalog = pipeline.artifacts.catalog

    def ids(self, idx: npt.NDArray[np.integer]) -> list[str]:
        return self.items_map.id_list(idx)

    def categories(self, idx: npt.NDArray[np.integer]) -> list[list[str]]:
        """Category names of each item (in catalogue order); [] for items it does not cover."""
        idx = np.asarray(idx, dtype=np.int64)
        covered = (idx >= 0) & (idx < self.catalog.n_items)
        out: list[list[str]] = [[] for _ in range(idx.size)]
        if not covered.any() or not self.catalog.n_categories:
            return out
        rows = self.catalog.categories[idx[covered]]
        names = np.asarray(self.catalog.category_names, dtype=object)
        per_row = np.split(names[rows.indices], rows.indptr[1:-1])
        for position, cats in zip(np.flatnonzero(covered), per_row, strict=True):
            out[position] = [str(c) for c in cats]
        return out

    def items(
        self,
        idx: npt.NDArray[np.integer],
        scores: npt.NDArray[np.floating] | None,
        sources: list[list[str]] | None = None,
    ) -> list[FunnelItemOut]:
        """``idx`` (m,) item indices (-1 padding dropped) with their ``scores`` (m,) if any."""
        keep = np.asarray(idx) != PAD_ITEM
        idx = np.asarray(idx)[keep]
        values = [None] * idx.size if scores is None else [_finite(s) for s in scores[keep]]
        provenance = (
            [[] for _ in range(idx.size)]
            if sources is None
            else [s for s, k in zip(sources, keep, strict=True) if k]
        )
        return [
            FunnelItemOut(item_id=i, rank=r + 1, score=s, sources=src, categories=cats)
            for r, (i, s, src, cats) in enumerate(
                zip(self.ids(idx), values, provenance, self.categories(idx), strict=True)
            )
        ]

    def history(self, users: UserBatch) -> list[HistoryItemOut]:
        items, times = users.recent_items[0], users.recent_times[0]
        valid = items != PAD_ITEM
        items, times = items[valid], times[valid]
        return [
            HistoryItemOut(item_id=i, timestamp=int(t), categories=c)
            for i, t, c in zip(self.ids(items), times, self.categories(items), strict=True)
        ]

    def final(self, answer: Recommendation) -> list[FunnelItemOut]:
        idx = self.items_map.index(answer.item_ids, allow_unknown=True)
        return [
            FunnelItemOut(item_id=i, rank=r + 1, score=_finite(s), sources=src, categories=c)
            for r, (i, s, src, c) in enumerate(
                zip(
                    answer.item_ids,
                    answer.scores,
                    answer.sources,
                    self.categories(idx),
                    strict=True,
                )
            )
        ]

    def rule(self, report: Any) -> dict[str, Any]:
        """One rule report as JSON: actions naming an item index also get its ``item_id``."""
        clean = _jsonable(report)
        if not isinstance(clean, dict):
            return {"rule": str(clean), "actions": []}
        actions = clean.get("actions")
        if isinstance(actions, list):
            for action in actions:
                item = action.get("item") if isinstance(action, dict) else None
                if isinstance(item, int) and 0 <= item < len(self.items_map):
                    action.setdefault("item_id", self.ids(np.array([item]))[0])
        return clean


def sample_users(pipeline: Pipeline, n: int) -> list[str]:
    """``n`` training users spread evenly over the (sorted) user map: deterministic, and not just
    the first few ids, which tend to share a prefix and look alike."""
    ids = pipeline.artifacts.users.ids
    if ids.len() == 0:
        return []
    positions = np.unique(np.linspace(0, ids.len() - 1, num=min(n, ids.len())).astype(np.int64))
    return ids.gather(positions).to_list()


def _ranker_name(pipeline: Pipeline) -> str:
    return MERGE_ORDER if pipeline.ranker is None else type(pipeline.ranker).__name__


def _finite(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _jsonable(value: Any) -> Any:
    """numpy scalars/arrays to Python, non-finite floats to None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _ms_since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)


def _err(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------ the router
def explorer_router(config: ExplorerConfig | None = None) -> APIRouter:
    """Routes of the explorer: the page at ``/``, its assets, and the two JSON endpoints."""
    config = config if config is not None else ExplorerConfig()
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "explorer.html", media_type="text/html; charset=utf-8")

    @router.get("/static/{name}", include_in_schema=False, response_model=None)
    def asset(name: str) -> FileResponse | JSONResponse:
        if name not in ASSETS:
            return JSONResponse(status_code=404, content={"error": f"no static file {name!r}"})
        return FileResponse(STATIC_DIR / name, media_type=ASSETS[name])

    # Declared before /v1/explore/{user_id}, which would otherwise take "_users" as a user id.
    @router.get("/v1/explore/_users", response_model=UsersOut)
    def users(
        request: Request,
        # A default-style Query: its limits come from ``config``, which a (string) annotation
        # under ``from __future__ import annotations`` could not see.
        n: int = Query(config.sample_users, ge=1, le=config.max_sample_users),
    ) -> UsersOut:
        return UsersOut(user_ids=sample_users(request.app.state.service.pipeline, n))

    @router.get(
        "/v1/explore/{user_id}", response_model=ExploreOut, responses={422: {"model": ErrorOut}}
    )
    def explore_user(
        request: Request,
        user_id: Annotated[Id, PathParam()],
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    ) -> ExploreOut:
        # Read the pipeline once: a hot reload may swap it while this request runs.
        pipeline: Pipeline = request.app.state.service.pipeline
        return explore(pipeline, user_id, k, ranked_shown=config.ranked_shown)

    return router
