"""``recsys evaluate``: the funnel-level offline report.

Full-catalogue ranking on the test split, seen items removed, for:
- the served pipeline and its stages (retrieval order, ranked, re-ranked; each rule's cost),
  all through the same ``Pipeline`` code that answers HTTP requests;
- baselines fitted on the same history (random, popularity, recency-weighted popularity, ALS,
  EASE), so the pipeline has to earn its complexity;
- beyond accuracy (coverage, novelty, diversity, popularity bias), segments (cold/light/heavy
  users, item-popularity buckets), bootstrap intervals and paired tests against each baseline;
- on a synthetic dataset, the oracle (true preferences) and each system's NDCG as a fraction of it.

Baselines are fitted on train + valid: the pipeline's retrieval saw only train (valid drove early
stopping and the ranker's labels), so the comparison, if anything, favours the baselines.

Every pipeline request is made at one fixed time, ``now`` (recorded in the report): by default
the moment the test window opens, after every history event (see :func:`request_time`). The wall
clock would make the report depend on when it was run (the ranker reads the hour, the weekday and
ages as of ``now``) and would ask a model trained on the log's time to score decades later.
``recsys recommend --now <report's now>`` then answers exactly what the ``pipeline`` system was
scored on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl
import scipy.sparse as sp

from data.dataset import Dataset, load_dataset
from data.errors import ConfigError
from data.interactions import Interactions
from data.progress import ProgressReporter, StageSteps, stage
from data.validation import positive_int
from evaluation import metrics as m
from evaluation.baselines import default_baselines
from evaluation.beyond_accuracy import beyond_accuracy
from evaluation.bootstrap import bootstrap_ci, paired_comparison
from evaluation.retrieval_eval import build_evaluation_users, retrieval_recall
from evaluation.segments import (
    activity_segments,
    bucket_metrics,
    cold_start_segments,
    item_popularity_buckets,
    segment_metrics,
    training_event_counts,
)
from pipeline.artifacts import Artifacts, load_artifacts
from pipeline.factory import make_pipeline, served_ranker
from pipeline.funnel import Pipeline, RecommendRequest
from pipeline.online_state import OnlineState, observe_frame
from pipeline.rules_adapter import RuleReranker
from reranking.config import RerankerConfig
from retrieval.base import PAD_ITEM

PIPELINE = "pipeline"
PER_USER_METRICS = ("ndcg", "recall", "mrr", "precision", "map", "hit_rate")


@dataclass(frozen=True)
class OfflineConfig:
    """ks: cutoffs for the ranking metrics; recall_cutoffs: for retrieval recall.
    max_users: evaluate a seeded sample of test users (None = all).
    n_boot: bootstrap resamples for intervals; baselines: which baselines to run.
    ease_max_items: EASE is O(n_items^2) memory; above this it is skipped (and said so).
    now: request time of every pipeline request, seconds UTC; None = :func:`request_time`.
    """

    ks: tuple[int, ...] = (10, 20, 50)
    recall_cutoffs: tuple[int, ...] = (50, 100, 200, 500)
    max_users: int | None = None
    n_boot: int = 500
    seed: int = 0
    baselines: tuple[str, ...] = ("random", "popular", "recent_popular", "als", "ease")
    ease_max_items: int = 20_000
    batch_size: int = 1_000
    now: int | None = None

    def __post_init__(self) -> None:
        if not self.ks:
            raise ConfigError("OfflineConfig.ks is empty: give at least one cutoff")
        for name in ("ks", "recall_cutoffs"):
            for k in getattr(self, name):
                positive_int(k, f"OfflineConfig.{name}")


# Name prefix of the pipelines that stop after the first i re-ranking rules (the rules' costs).
RULES_PREFIX = "rules:"
# Recommends, for every pipeline of evaluation_pipelines(), (n_users, k) item indices:
# (bundle dir, data dir, user ids, k, now) -> {pipeline name: items}. None: in this process.
PipelineEngine = Callable[[Path, Path, list[str], int, int], dict[str, npt.NDArray[np.int32]]]


def evaluate_offline(
    data_dir: str | Path,
    bundle_dir: str | Path,
    config: OfflineConfig | None = None,
    *,
    progress: ProgressReporter | None = None,
    engine: PipelineEngine | None = None,
) -> dict[str, Any]:
    """Run the whole evaluation; returns the report (the content of ``report.json``).

    ``progress`` receives the stages: loading, each system's recommendations (one step per
    batch of users), the rules, the sources, each baseline, the oracle, metrics, bootstrap.
    ``engine`` answers the pipelines' requests elsewhere (``evaluation.ray_engine``); each
    user's answer depends only on that user, so the report is the same."""
    config = config or OfflineConfig()
    started = time.perf_counter()
    with stage(progress, "load bundle and data"):
        artifacts = load_artifacts(bundle_dir)
        dataset = load_dataset(data_dir)
        history = evaluation_history(dataset)
        test = dataset.splits["test"]
        evaluation = build_evaluation_users(
            artifacts,
            history,
            test,
            history_length=artifacts.retrieval.config.history_length,
            max_users=config.max_users,
            seed=config.seed,
        )
    keep = np.diff(evaluation.relevant.indptr) > 0  # users with something new to find
    relevant = evaluation.relevant[keep]
    user_ids = evaluation.user_ids.filter(pl.Series(keep)).to_list()
    seen = evaluation.seen[keep]
    k_max = max(config.ks)
    now = config.now if config.now is not None else request_time(history, test)

    if engine is None:
        recommended: dict[str, npt.NDArray[np.int32]] = {}
        pipelines = evaluation_pipelines(artifacts, _history_state(artifacts, history))
        n_batches = -(-len(user_ids) // config.batch_size)
        for name, pipeline in pipelines.items():
            with stage(progress, f"recommend: {name}", total=n_batches) as batches:
                recommended[name] = recommend_items(
                    pipeline, user_ids, k_max, now, config.batch_size, batches=batches
                )
    else:
        with stage(progress, "recommend: every pipeline (engine)"):
            recommended = engine(Path(bundle_dir), Path(data_dir), user_ids, k_max, now)
    systems = {
        name: items for name, items in recommended.items() if not name.startswith(RULES_PREFIX)
    }
    with stage(progress, "re-ranking rules"):
        rule_costs = _rule_costs(artifacts, recommended, relevant, config)
    # Each candidate source's own order: the bar the ranker has to clear.
    with stage(progress, "recommend: each source"):
        own_order = artifacts.retrieval.retrieve_each(
            evaluation.users.take(np.flatnonzero(keep)), k_max, exclude=seen
        )
    for name, candidates in own_order.items():
        systems[f"source:{name}"] = candidates.item_idx

    history_log = Interactions.from_frame(history, items=artifacts.items, drop_unknown=True)
    rows = history_log.users.index(pl.Series(user_ids), allow_unknown=True)
    skipped: dict[str, str] = {}
    for name, baseline in default_baselines(seed=config.seed).items():
        if name not in config.baselines:
            continue
        if name == "ease" and len(artifacts.items) > config.ease_max_items:
            skipped[name] = f"{len(artifacts.items)} items > ease_max_items {config.ease_max_items}"
            continue
        with stage(progress, f"baseline: {name}"):
            systems[name] = baseline.fit(history_log).recommend(rows, k_max, seen)

    test_start = int(test["timestamp"].to_numpy().min())
    with stage(progress, "oracle"):
        oracle = _oracle(dataset.path, artifacts, user_ids, seen, k_max, test_start)
    if oracle is not None:
        systems["oracle"] = oracle

    with stage(progress, "metrics"):
        per_user = {
            name: _per_user_metrics(rec, relevant, config.ks) for name, rec in systems.items()
        }
        recall = retrieval_recall(artifacts, evaluation, tuple(sorted(config.recall_cutoffs)))
    with stage(progress, "bootstrap"):
        intervals = {
            name: {
                metric: bootstrap_ci(values, n_boot=config.n_boot, seed=config.seed).to_dict()
                for metric, values in metrics_.items()
            }
            for name, metrics_ in per_user.items()
        }
        paired = {
            name: paired_comparison(
                per_user[name][f"ndcg@{config.ks[0]}"],
                per_user[PIPELINE][f"ndcg@{config.ks[0]}"],
                n_boot=config.n_boot,
                seed=config.seed,
            ).to_dict()
            for name in per_user
            if name not in (PIPELINE, "oracle") and not name.startswith("source:")
        }
    with stage(progress, "beyond accuracy and segments"):
        beyond = {
            name: beyond_accuracy(
                rec,
                history_log.item_counts,
                config.ks,
                item_vectors=artifacts.catalog.categories
                if artifacts.catalog.n_categories
                else None,
            )
            for name, rec in systems.items()
        }
        segments = _segments(history_log, rows, per_user, relevant, systems, config)
    report: dict[str, Any] = {
        "bundle": str(bundle_dir),
        "model_version": artifacts.model_version,
        "data": str(data_dir),
        "n_users": int(keep.sum()),
        "now": now,
        "ks": list(config.ks),
        "retrieval": recall,
        "systems": intervals,
        "beyond_accuracy": beyond,
        "paired_vs_pipeline": paired,
        "rules": rule_costs,
        "segments": segments,
        "skipped": skipped,
        "funnel": funnel_choices(artifacts, timed=dataset.timed),
    }
    if oracle is not None:
        ndcg = f"ndcg@{config.ks[0]}"
        best = report["systems"]["oracle"][ndcg]["mean"]
        report["oracle_fraction"] = {
            name: (values[ndcg]["mean"] / best if best > 0 else float("nan"))
            for name, values in report["systems"].items()
        }
    report["seconds"] = time.perf_counter() - started
    return report


def funnel_choices(artifacts: Artifacts, *, timed: bool) -> dict[str, Any]:
    """What training chose on the validation window, as the report shows it: the merge order
    with each source's own nDCG@10, and whether the ranker beat that order (and so serves)."""
    choices: dict[str, Any] = {
        "timed": timed,
        "merge_order": list(artifacts.retrieval.source_names),
        "source_validation_ndcg@10": dict(artifacts.retrieval.validation_),
        "skipped_sources": dict(artifacts.retrieval.skipped_),
    }
    ranking = artifacts.ranking
    if ranking is not None:
        summary = ranking.summary_
        choices["ranker"] = {"served": ranking.selected_, "model": ranking.model_kind} | {
            key: value for key, value in summary.items() if key.startswith("valid_ndcg")
        }
    return choices


def request_time(history: pl.DataFrame, test: pl.DataFrame) -> int:
    """The default ``now`` of the evaluation requests, seconds UTC.

    The later of the last history (train + valid) event and the first test event: for a temporal
    split, the moment the test window opens; for a random split, whose test events interleave
    with the history, the first moment at which everything in the user state has happened.
    """
    bounds = [int(history["timestamp"].to_numpy().max())] if history.height else []
    if test.height:
        bounds.append(int(test["timestamp"].to_numpy().min()))
    return max(bounds, default=0)


def evaluation_history(dataset: Dataset) -> pl.DataFrame:
    """The users' state before the test window: train + valid events."""
    return pl.concat([dataset.splits["train"], dataset.splits["valid"]])


def evaluation_state(artifacts: Artifacts, data_dir: str | Path) -> OnlineState:
    """The online state every evaluated pipeline answers from (what a worker rebuilds)."""
    return _history_state(artifacts, evaluation_history(load_dataset(data_dir)))


def evaluation_pipelines(artifacts: Artifacts, state: OnlineState) -> dict[str, Pipeline]:
    """Every pipeline the report scores: the served funnel and its stages, and the funnel
    after each prefix of the re-ranking rules (``rules:i``, the first i rules)."""
    pipelines = _stage_pipelines(artifacts, state)
    rules = RerankerConfig.from_mapping(artifacts.manifest["config"].get("reranking")).rules
    for i in range(len(rules) + 1):
        pipelines[f"{RULES_PREFIX}{i}"] = Pipeline(
            artifacts,
            state,
            ranker=served_ranker(artifacts),
            reranker=RuleReranker(RerankerConfig(tuple(rules[:i])), artifacts.catalog),
            enforce_budgets=False,
        )
    return pipelines


def _history_state(artifacts: Artifacts, history: pl.DataFrame) -> OnlineState:
    state = OnlineState(
        artifacts.users, len(artifacts.items), artifacts.retrieval.config.history_length
    )
    observe_frame(state, artifacts.items, history)
    return state


def _stage_pipelines(artifacts: Artifacts, state: OnlineState) -> dict[str, Pipeline]:
    """The served funnel and its prefixes, all the same Pipeline class (no budgets offline).

    The full funnel comes from the factory that ``recsys recommend`` and the service use, so the
    ``pipeline`` system cannot be wired differently from what they serve.
    """
    pipelines = {"retrieval_order": Pipeline(artifacts, state, enforce_budgets=False)}
    if artifacts.ranking is not None:
        artifacts.ranking.warm()  # LightGBM compiles its trees, as the service does
        pipelines["ranked"] = Pipeline(
            artifacts, state, ranker=artifacts.ranking, enforce_budgets=False
        )
    pipelines[PIPELINE] = make_pipeline(artifacts, state, enforce_budgets=False)
    return pipelines


def recommend_items(
    pipeline: Pipeline,
    user_ids: list[str],
    k: int,
    now: int,
    batch_size: int,
    *,
    batches: StageSteps | None = None,
) -> npt.NDArray[np.int32]:
    """(n, k) item indices in the bundle's item space, through ``Pipeline.recommend`` at ``now``;
    ``batches`` advances once per batch of ``batch_size`` users."""
    out = np.full((len(user_ids), k), PAD_ITEM, dtype=np.int32)
    items = pipeline.artifacts.items
    for start in range(0, len(user_ids), batch_size):
        chunk = user_ids[start : start + batch_size]
        answers = pipeline.recommend([RecommendRequest(u, k=k, now=now) for u in chunk])
        for offset, answer in enumerate(answers):
            if answer.item_ids:
                index = items.index(answer.item_ids)
                out[start + offset, : index.size] = index
        if batches is not None:
            batches.advance()
    return out


def _rule_costs(
    artifacts: Artifacts,
    recommended: dict[str, npt.NDArray[np.int32]],
    relevant: sp.csr_matrix,
    config: OfflineConfig,
) -> list[dict[str, Any]]:
    """NDCG@k after each re-ranking rule (prefixes of the rule list), and what it changed."""
    rules = RerankerConfig.from_mapping(artifacts.manifest["config"].get("reranking")).rules
    out = []
    for i in range(len(rules) + 1):
        rec = recommended[f"{RULES_PREFIX}{i}"]
        cut = config.ks[0]
        out.append(
            {
                "after": "ranked" if i == 0 else type(rules[i - 1]).__name__,
                f"ndcg@{cut}": m.mean(m.ndcg_at_k(rec, relevant, cut)).value,
                f"coverage@{cut}": m.catalog_coverage(rec, relevant.shape[1], cut),
            }
        )
    return out


def _per_user_metrics(
    rec: npt.NDArray[np.int32], relevant: sp.csr_matrix, ks: tuple[int, ...]
) -> dict[str, npt.NDArray[np.float64]]:
    functions = {
        "ndcg": m.ndcg_at_k,
        "recall": m.recall_at_k,
        "mrr": m.mrr_at_k,
        "precision": m.precision_at_k,
        "map": m.average_precision_at_k,
        "hit_rate": m.hit_rate_at_k,
    }
    return {
        f"{name}@{k}": functions[name](rec, relevant, k) for k in ks for name in PER_USER_METRICS
    }


def _segments(
    history_log: Interactions,
    rows: npt.NDArray[np.int32],
    per_user: dict[str, dict[str, npt.NDArray[np.float64]]],
    relevant: sp.csr_matrix,
    systems: dict[str, npt.NDArray[np.int32]],
    config: OfflineConfig,
) -> dict[str, Any]:
    counts = training_event_counts(history_log, rows)
    metric = f"ndcg@{config.ks[0]}"
    chosen = {name: {metric: values[metric]} for name, values in per_user.items()}
    buckets = item_popularity_buckets(history_log.item_counts, n_items=relevant.shape[1])
    return {
        "cold_start": {
            name: segment_metrics(v, cold_start_segments(counts), n_boot=config.n_boot)
            for name, v in chosen.items()
        },
        "activity": {
            name: segment_metrics(v, activity_segments(counts), n_boot=config.n_boot)
            for name, v in chosen.items()
        },
        "item_popularity": {
            name: bucket_metrics(rec, relevant, buckets, config.ks[:1], n_boot=config.n_boot)
            for name, rec in systems.items()
        },
    }


def _oracle(
    data_dir: Path,
    artifacts: Artifacts,
    user_ids: list[str],
    seen: sp.csr_matrix,
    k: int,
    t: int,
) -> npt.NDArray[np.int32] | None:
    """The true-preference ranking of a synthetic world, in the bundle's item space."""
    from data.synthetic.world import World

    if not (data_dir / "world").is_dir():
        return None
    world = World.load(data_dir / "world")
    world_users = np.array([int(u[1:]) for u in user_ids], dtype=np.int64)
    seen_ids = [artifacts.items.id_list(seen[r].indices) for r in range(seen.shape[0])]
    exclude = [np.array([int(i[1:]) for i in ids], dtype=np.int64) for ids in seen_ids]
    items, _ = world.true_top_k(world_users, k, t, exclude=exclude)
    names = pl.Series([f"i{i}" if i >= 0 else "" for i in items.ravel()])
    index = artifacts.items.index(names, allow_unknown=True).reshape(items.shape)
    # Items unknown to the bundle cannot be served; they stay as misses rather than padding.
    return _left_align(index.astype(np.int32))


def _left_align(rec: npt.NDArray[np.int32]) -> npt.NDArray[np.int32]:
    order = np.argsort(rec == PAD_ITEM, axis=1, kind="stable")
    return np.take_along_axis(rec, order, axis=1)


def write_report(report: dict[str, Any], out_dir: Path, bundle_dir: Path) -> list[Path]:
    """``report.json``, ``report.md`` and the plots; returns the written paths."""
    from evaluation.plots import (
        plot_funnel,
        plot_metric_curves,
        plot_segment_bars,
        plot_training_curves,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "report.json", out_dir / "report.md"]
    written[0].write_text(json.dumps(report, indent=2, sort_keys=True, default=_json_default))
    written[1].write_text(render_markdown(report))
    means = {
        name: {metric: ci["mean"] for metric, ci in values.items()}
        for name, values in report["systems"].items()
    }
    written.append(plot_metric_curves(means, ["ndcg", "recall"], out_dir / "metrics_at_k.png"))
    merged = report["retrieval"]["merged"]
    cut = report["ks"][0]
    # Retrieval keeps this much of the future (merged candidates); the ranked list then scores.
    funnel = dict(merged) | {f"final ndcg@{cut}": means[PIPELINE][f"ndcg@{cut}"]}
    written.append(plot_funnel(funnel, out_dir / "funnel.png"))
    written.append(
        plot_segment_bars(report["segments"]["activity"], f"ndcg@{cut}", out_dir / "segments.png")
    )
    curves = bundle_dir / "retrieval" / "two_tower" / "curves.json"
    if curves.is_file():
        written.append(plot_training_curves(curves, out_dir / "two_tower_curves.png"))
    return written


def render_markdown(report: dict[str, Any]) -> str:
    cut = report["ks"][0]
    lines = [
        f"# Offline evaluation: bundle `{report['model_version']}`",
        "",
        f"{report['n_users']:,} test users; full-catalogue ranking, seen items removed; "
        f"requests at now = {report.get('now')} (seconds UTC).",
        "",
        f"## Systems (NDCG@{cut}, 95% bootstrap interval)",
        "",
        f"| system | ndcg@{cut} | recall@{cut} | mrr@{cut} | coverage@{cut} |",
        "|---|---|---|---|---|",
    ]
    for name, values in report["systems"].items():
        ci = values[f"ndcg@{cut}"]
        lines.append(
            f"| {name} | {ci['mean']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}] | "
            f"{values[f'recall@{cut}']['mean']:.4f} | {values[f'mrr@{cut}']['mean']:.4f} | "
            f"{report['beyond_accuracy'][name].get(f'coverage@{cut}', float('nan')):.4f} |"
        )
    lines += [
        "",
        "## Pipeline vs baselines (paired, NDCG)",
        "",
        "| baseline | difference | p |",
        "|---|---|---|",
    ]
    for name, cmp in report["paired_vs_pipeline"].items():
        lines.append(
            f"| {name} | {cmp['difference']:+.4f} [{cmp['low']:+.4f}, {cmp['high']:+.4f}] "
            f"| {cmp['p_value']:.2g} |"
        )
    lines += [
        "",
        "## Retrieval recall",
        "",
        "| source | " + " | ".join(next(iter(report["retrieval"].values()))) + " |",
    ]
    lines.append("|---" * (1 + len(next(iter(report["retrieval"].values())))) + "|")
    for name, values in report["retrieval"].items():
        if not name.startswith("_"):
            lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values.values()) + " |")
    lines += ["", "## Re-ranking rules (cost of each, cumulative)", ""]
    lines += [
        f"- after {r['after']}: " + ", ".join(f"{k} {v:.4f}" for k, v in r.items() if k != "after")
        for r in report["rules"]
    ]
    lines += _render_funnel_choices(report.get("funnel"))
    if "oracle_fraction" in report:
        lines += ["", "## Fraction of the oracle's NDCG (synthetic ground truth)", ""]
        lines += [f"- {name}: {value:.3f}" for name, value in report["oracle_fraction"].items()]
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {k}: {v}" for k, v in report["skipped"].items()]
    return "\n".join(lines) + "\n"


def _render_funnel_choices(choices: dict[str, Any] | None) -> list[str]:
    if not choices:
        return []
    lines = ["", "## Choices made on the validation window", ""]
    quality = choices["source_validation_ndcg@10"]
    lines.append(
        "- merge order (best first): "
        + ", ".join(
            f"{name} ({quality[name]:.4f})" if name in quality else name
            for name in choices["merge_order"]
        )
    )
    for name, reason in choices.get("skipped_sources", {}).items():
        lines.append(f"- {name} left out: {reason}")
    ranker = choices.get("ranker")
    if ranker is None:
        lines.append("- ranker: none trained (no validation window); the merge order is served")
    else:
        figures = ", ".join(
            f"{k} {v:.4f}" for k, v in ranker.items() if k not in ("served", "model")
        )
        verdict = f"{ranker['model']} served" if ranker["served"] else "not served: merge order"
        lines.append(f"- ranker: {verdict} ({figures})")
    if not choices["timed"]:
        lines.append(
            "- untimed log: every event shares one time, so the ranker's time features are "
            "constant (unused), trending ranks as popularity and recency rules change nothing"
        )
    return lines


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")
