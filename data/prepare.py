"""From a raw interaction log to a dataset directory: optional implicit conversion, split, write.

Every ``recsys data ...`` command ends here, so synthetic, MovieLens and imported data are split and
written by one code path.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import polars as pl

from data.dataset import write_dataset
from data.errors import DataError
from data.schema import ITEM_ID, SPLIT_NAMES, TIMESTAMP, USER_ID, conform_interactions
from data.splits import SplitConfig, check_temporal_leakage, split_interactions

_TEMPORAL_METHODS = ("temporal", "leave_last_n")


def prepare_dataset(
    out_dir: str | Path,
    interactions: pl.DataFrame,
    *,
    split: SplitConfig,
    source: dict[str, Any],
    test: pl.DataFrame | None = None,
    items: pl.DataFrame | None = None,
    users: pl.DataFrame | None = None,
    timed: bool = True,
) -> dict[str, Any]:
    """Split ``interactions`` and write the dataset directory; returns its manifest.

    Without ``test``, the log is split by ``split`` (temporal by default: random splits of behaviour
    logs leak the future). With ``test``, that frame *is* the test set, kept exactly as given, and
    only the validation set is carved from ``interactions`` by ``split``.

    ``timed=False`` is a log without event times: splits that need time (temporal,
    leave_last_n) are refused, since any order they used would be invented.
    """
    if not timed and split.method in _TEMPORAL_METHODS:
        raise DataError(
            f"split {split.method!r} needs event times, but the log has none; "
            "use --split random (per user) or user_disjoint"
        )
    interactions = conform_interactions(interactions, "interactions")
    if test is None:
        splits = split_interactions(interactions, split)
        split_method: dict[str, Any] = asdict(split)
    else:
        test = conform_interactions(test, "test set")
        # Carve validation from the training log only; the given test set is never touched.
        carve = split_interactions(interactions, _validation_only(split))
        splits = {"train": carve["train"], "valid": carve["test"], "test": test}
        split_method = {**asdict(split), "method": f"given_test+{split.method}"}
        interactions = pl.concat([interactions, test]).sort(TIMESTAMP, maintain_order=True)

    if split.method in _TEMPORAL_METHODS and test is None:
        # A temporal split that leaks is a bug, not a data problem: fail loudly before writing.
        per_user = split.method == "leave_last_n"
        for later in ("valid", "test"):
            if splits[later].height:
                check_temporal_leakage(
                    splits["train"], splits[later], per_user=per_user
                ).raise_if_leaky()
    for name in SPLIT_NAMES:
        if name != "valid" and splits[name].height == 0:
            raise DataError(
                f"the {name} split is empty ({interactions.height} interactions, "
                f"split {split.method!r}); "
                "use more data or larger split fractions"
            )
    return write_dataset(
        out_dir,
        interactions,
        splits,
        source=source,
        split_method=split_method,
        items=_unique_ids(items, ITEM_ID),
        users=_unique_ids(users, USER_ID),
        timed=timed,
    )


def _validation_only(split: SplitConfig) -> SplitConfig:
    """The same method, used once to cut a validation slice off the training log."""
    return SplitConfig(
        method=split.method,
        test_fraction=split.valid_fraction,
        valid_fraction=0.0,
        n_test=split.n_valid,
        n_valid=0,
        seed=split.seed,
    )


def _unique_ids(frame: pl.DataFrame | None, id_col: str) -> pl.DataFrame | None:
    """One row per id (first wins).

    Ids absent from the log are kept: they are cold-start items and users, not errors.
    """
    if frame is None:
        return None
    if id_col not in frame.columns:
        raise DataError(f"side table: missing column {id_col!r}; found {frame.columns}")
    return frame.with_columns(pl.col(id_col).cast(pl.String)).unique(
        id_col, keep="first", maintain_order=True
    )
