"""Assemble a :class:`Pipeline` from a loaded bundle: the one place the stages are wired.

The service, batch recommendation, offline evaluation and the simulator all build their pipeline
here, so none of them can end up with a differently wired funnel.
"""

from __future__ import annotations

from pipeline.artifacts import Artifacts, load_history
from pipeline.funnel import BudgetConfig, Pipeline
from pipeline.online_state import OnlineState, observe_frame
from pipeline.rules_adapter import RuleReranker
from ranking.stage import RankingStage
from reranking.config import RerankerConfig


def online_state_for(artifacts: Artifacts) -> OnlineState:
    """A fresh online state seeded with the bundle's history snapshot."""
    state = OnlineState(
        artifacts.users, len(artifacts.items), artifacts.retrieval.config.history_length
    )
    observe_frame(state, artifacts.items, load_history(artifacts))
    return state


def served_ranker(artifacts: Artifacts) -> RankingStage | None:
    """The bundle's ranker if it was trained and selected on validation (it beat the retrieval
    order there: ``RankingConfig.min_lift``); ``None`` serves the retrieval order."""
    ranking = artifacts.ranking
    return ranking if ranking is not None and ranking.selected_ else None


def make_pipeline(
    artifacts: Artifacts,
    state: OnlineState,
    *,
    budgets: BudgetConfig | None = None,
    enforce_budgets: bool = True,
) -> Pipeline:
    """The bundle's funnel: retrieval, its served ranker and its re-ranking rules."""
    rules = RerankerConfig.from_mapping(artifacts.manifest["config"].get("reranking"))
    return Pipeline(
        artifacts,
        state,
        ranker=served_ranker(artifacts),
        reranker=RuleReranker(rules, artifacts.catalog),
        budgets=budgets,
        enforce_budgets=enforce_budgets,
    )
