"""``TwoTowerConfig``: architecture, loss and training knobs of the two-tower model.

Every default is documented where it is declared, so a reader can see why it is what it is. A
TOML table maps onto it with ``data.configuration.from_mapping``. The defaults suit the embedded
synthetic dataset (~5k users x 2k items x 200k events) on a laptop CPU; larger catalogues want a
wider ``embedding_dim`` and bigger batches.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal, get_args

from data.errors import ConfigError
from data.validation import (
    fraction,
    integer,
    non_negative_float,
    non_negative_int,
    one_of,
    positive_float,
    positive_int,
)

Pooling = Literal["mean", "attention"]
Loss = Literal["sampled_softmax", "bpr"]
Device = Literal["cpu", "cuda"]
SparseEmbeddings = Literal["auto"] | bool

# ``sparse_embeddings="auto"`` turns sparse updates on above this many id rows (user + item
# tables together). Dense AdamW reads and writes every row of both tables (weight, gradient, two
# moments) each step, so its cost grows with the tables; a sparse step's grows with the batch.
# From 100k rows sparse wins by 2.5x and more; below ~30k dense is as fast and keeps the
# tested defaults' numbers exactly (step times: docs/benchmarks.md, "Measurements behind the
# defaults").
SPARSE_AUTO_MIN_ROWS = 100_000


@dataclass(frozen=True)
class TwoTowerConfig:
    """How the two-tower model is built and trained.

    Architecture
        embedding_dim: width of every id / category / age embedding.
        hidden_dims: hidden layer widths of each tower's MLP (ReLU + dropout after each).
        output_dim: width of the final, L2-normalised user and item vectors (the ANN index dim).
        history_length: H, how many recent items describe a user (most recent first).
        pooling: ``"mean"`` (recency-weighted mean) or ``"attention"`` (a learned score per
            history item, plus the log recency weight, softmaxed over the history).
        recency_decay: weight of the history item at position ``p`` (0 = most recent) is
            ``recency_decay ** p``: the last few items say most about the next one.
        age_bucket_days: upper edges (days) of the item-age buckets fed to the item tower;
            roughly log-spaced because "new this week" matters more than "275 vs 300 days".
        dropout: dropout probability after each hidden layer.
        user_id_dropout: chance a training example hides its user id (uses the "unknown user"
            row), so the tower learns to serve unknown users from their history alone.
        item_id_dropout: chance a training item hides its id (uses the "unknown item" row), so
            the item tower learns a features-only vector for items never seen in training.

    Loss
        loss: ``"sampled_softmax"`` (in-batch softmax with logQ correction, Yi et al. 2019,
            "Sampling-bias-corrected neural modeling for large corpus item recommendations")
            or ``"bpr"`` (Rendle et al. 2009, pairwise against the same negatives).
        temperature: softmax temperature on cosine scores; 0.05 turns cosine's [-1, 1] into
            logits spread enough to learn from (Yi et al. tune it in [0.05, 0.1]).
        logq_correction: subtract log of each candidate's sampling probability from its logit.
        n_uniform_negatives: extra negatives drawn uniformly from the catalogue per batch and
            shared by its rows (mixed negative sampling, Yang et al. 2020): in-batch negatives
            are all popular, uniform ones teach the tail.

    Optimisation
        batch_size: examples per step; also the number of in-batch negatives.
        learning_rate, weight_decay: AdamW (decoupled weight decay, Loshchilov & Hutter 2019).
        grad_clip_norm: clip the global gradient norm (guards the first, noisy steps); 0 = off.
        max_epochs: passes over the training events.
        patience: epochs without a better validation recall before stopping (best weights kept).
        eval_k: K of the validation recall@K that drives early stopping.
        valid_max_users: validation users scored per epoch (a seeded sample), to bound its cost.
        seed: seeds torch and the numpy Generator (shuffling, dropout masks, negatives).
        encode_batch_size: rows per forward pass when encoding the catalogue or many users
            (bounds memory; the vectors do not depend on it beyond float rounding).
        sparse_embeddings: how the user- and item-id tables are updated. ``False``: dense
            gradients and AdamW, like every other parameter. ``True``: sparse gradients and
            ``torch.optim.SparseAdam``, so a step touches only the rows its batch looked up, not
            the whole catalogue; SparseAdam has no weight decay, so the looked-up rows carry an
            L2 penalty of ``weight_decay`` instead (the other parameters keep AdamW). ``"auto"``
            (default): sparse when the two tables hold more than ``SPARSE_AUTO_MIN_ROWS`` rows
            together, where the dense update of every row dominates a step.
        device: ``"cpu"`` or ``"cuda"``.
        num_threads: torch intra-op CPU threads while training and encoding; ``None``
            (default) keeps torch's own default (one per core). Set on a shared machine: with
            every core busy, waiting threads stall each step of a small model. (TOML files may
            still call it ``threads``.)
        progress: show a tqdm bar per epoch.
        min_interactions: the retrieval stage leaves the two-tower out of a bundle whose
            training log has fewer events. Below ~100k events a neural retriever has too
            little to learn from to beat the neighbourhood models and ALS, and it dominates the
            training time: on Last.fm (48k events) it was 93% of a default ``recsys train``
            and scored nDCG@10 0.247 alone against EASE's 0.278 (``docs/benchmarks.md``,
            quality section). 0 always trains it.
    """

    renamed_keys: ClassVar[Mapping[str, str]] = MappingProxyType({"threads": "num_threads"})

    # Architecture
    embedding_dim: int = 32
    hidden_dims: tuple[int, ...] = (64,)
    output_dim: int = 32
    history_length: int = 20
    pooling: Pooling = "mean"
    recency_decay: float = 0.9
    age_bucket_days: tuple[float, ...] = (1.0, 7.0, 30.0, 90.0, 365.0)
    dropout: float = 0.1
    user_id_dropout: float = 0.1
    item_id_dropout: float = 0.1
    # Loss
    loss: Loss = "sampled_softmax"
    temperature: float = 0.05
    logq_correction: bool = True
    n_uniform_negatives: int = 0
    # Optimisation
    batch_size: int = 512
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    grad_clip_norm: float = 5.0
    max_epochs: int = 20
    patience: int = 3
    eval_k: int = 100
    valid_max_users: int = 2_000
    seed: int = 0
    encode_batch_size: int = 8_192
    sparse_embeddings: SparseEmbeddings = "auto"
    device: Device = "cpu"
    num_threads: int | None = None
    progress: bool = False
    min_interactions: int = 100_000

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and the round trip exact.
        object.__setattr__(self, "hidden_dims", tuple(int(x) for x in self.hidden_dims))
        object.__setattr__(self, "age_bucket_days", tuple(float(x) for x in self.age_bucket_days))
        _validate(self)

    def sparse_id_tables(self, n_users: int, n_items: int) -> bool:
        """Whether the id tables of ``n_users`` and ``n_items`` (plus one "unknown" row each)
        train with sparse gradients."""
        if self.sparse_embeddings == "auto":
            return (n_users + 1) + (n_items + 1) > SPARSE_AUTO_MIN_ROWS
        return bool(self.sparse_embeddings)

    @property
    def n_age_buckets(self) -> int:
        """Buckets of the item-age embedding: unknown release time, then one per edge + overflow."""
        return len(self.age_bucket_days) + 2


def _validate(c: TwoTowerConfig) -> None:
    """Raise ``ConfigError`` naming the first invalid field and its value."""
    non_negative_int(c.min_interactions, "TwoTowerConfig.min_interactions")
    positive_ints = ("embedding_dim", "output_dim", "history_length", "batch_size", "max_epochs",
                     "patience", "eval_k", "valid_max_users", "encode_batch_size")  # fmt: skip
    for name in positive_ints:
        positive_int(getattr(c, name), f"TwoTowerConfig.{name}")
    if any(width < 1 for width in c.hidden_dims):
        raise ConfigError(f"TwoTowerConfig.hidden_dims must be positive, got {c.hidden_dims!r}")
    edges = c.age_bucket_days
    if any(not math.isfinite(e) or e <= 0 for e in edges) or list(edges) != sorted(set(edges)):
        raise ConfigError(
            f"TwoTowerConfig.age_bucket_days must be increasing positive days, got {edges!r}"
        )
    for name in ("dropout", "user_id_dropout", "item_id_dropout"):
        fraction(getattr(c, name), f"TwoTowerConfig.{name}", high_open=True)
    fraction(c.recency_decay, "TwoTowerConfig.recency_decay", low_open=True)
    for name in ("temperature", "learning_rate"):
        positive_float(getattr(c, name), f"TwoTowerConfig.{name}")
    for name in ("weight_decay", "grad_clip_norm"):
        non_negative_float(getattr(c, name), f"TwoTowerConfig.{name}")
    for name in ("n_uniform_negatives", "seed"):
        non_negative_int(getattr(c, name), f"TwoTowerConfig.{name}")
    integer(c.num_threads, "TwoTowerConfig.num_threads", minimum=1, none_ok=True)
    sparse = c.sparse_embeddings
    if not isinstance(sparse, bool) and sparse != "auto":
        raise ConfigError(
            f"TwoTowerConfig.sparse_embeddings must be true, false or 'auto', got {sparse!r}"
        )
    choices: tuple[tuple[str, Any], ...] = (
        ("pooling", Pooling),
        ("loss", Loss),
        ("device", Device),
    )
    for name, literal in choices:
        one_of(getattr(c, name), f"TwoTowerConfig.{name}", get_args(literal))
