"""``Interactions``: an interaction log in index space, the form every model trains on.

The dataset directory speaks string ids; models speak contiguous indices. ``Interactions`` holds
the log as parallel numpy arrays plus the two ``IdMap``s, and builds the sparse user x item matrix
that ALS, co-visitation, negative sampling and the metrics need.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt
import polars as pl
import scipy.sparse as sp

from data.errors import DataError
from data.idmap import IdMap
from data.schema import ITEM_ID, TIMESTAMP, USER_ID, WEIGHT, conform_interactions


@dataclass(frozen=True, eq=False)
class Interactions:
    """A log of ``n`` events over ``len(users)`` x ``len(items)``, sorted by timestamp.

    user_idx, item_idx: (n,) int32 indices into ``users`` / ``items``
    timestamp:          (n,) int64 seconds UTC
    weight:             (n,) float32
    """

    users: IdMap
    items: IdMap
    user_idx: npt.NDArray[np.int32]
    item_idx: npt.NDArray[np.int32]
    timestamp: npt.NDArray[np.int64]
    weight: npt.NDArray[np.float32]

    @classmethod
    def from_frame(
        cls,
        frame: pl.DataFrame,
        *,
        users: IdMap | None = None,
        items: IdMap | None = None,
        drop_unknown: bool = False,
    ) -> Interactions:
        """Index a canonical interaction frame.

        Without ``users`` / ``items`` the maps are built from the frame. With them (e.g. the
        training maps, when indexing a test split), rows with unknown ids raise ``DataError``, or
        are dropped if ``drop_unknown`` (the caller then handles those users/items as cold).
        """
        frame = conform_interactions(frame, "interactions").sort(TIMESTAMP, maintain_order=True)
        users = users if users is not None else IdMap.from_ids(frame[USER_ID])
        items = items if items is not None else IdMap.from_ids(frame[ITEM_ID])
        user_idx = users.index(frame[USER_ID], allow_unknown=drop_unknown)
        item_idx = items.index(frame[ITEM_ID], allow_unknown=drop_unknown)
        keep = (user_idx >= 0) & (item_idx >= 0)
        return cls(
            users=users,
            items=items,
            user_idx=user_idx[keep],
            item_idx=item_idx[keep],
            timestamp=frame[TIMESTAMP].to_numpy()[keep],
            weight=frame[WEIGHT].to_numpy()[keep],
        )

    def __post_init__(self) -> None:
        n = self.user_idx.shape[0]
        lengths = {len(a) for a in (self.item_idx, self.timestamp, self.weight)}
        if lengths != {n}:
            raise DataError(f"interaction arrays differ in length: {n} users vs {sorted(lengths)}")

    def __len__(self) -> int:
        return int(self.user_idx.shape[0])

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @cached_property
    def matrix(self) -> sp.csr_matrix:
        """(n_users, n_items) float32 CSR, repeated (user, item) events summed, indices sorted."""
        matrix = sp.csr_matrix(
            (self.weight.astype(np.float32), (self.user_idx, self.item_idx)),
            shape=(self.n_users, self.n_items),
            dtype=np.float32,
        )
        matrix.sum_duplicates()
        return matrix

    @cached_property
    def item_counts(self) -> npt.NDArray[np.int64]:
        """(n_items,) number of events per item."""
        return np.bincount(self.item_idx, minlength=self.n_items).astype(np.int64)

    @cached_property
    def user_counts(self) -> npt.NDArray[np.int64]:
        """(n_users,) number of events per user."""
        return np.bincount(self.user_idx, minlength=self.n_users).astype(np.int64)

    def before(self, timestamp: int) -> Interactions:
        """The events strictly before ``timestamp`` (same id maps): a point-in-time view."""
        end = int(np.searchsorted(self.timestamp, timestamp, side="left"))
        return Interactions(
            users=self.users,
            items=self.items,
            user_idx=self.user_idx[:end],
            item_idx=self.item_idx[:end],
            timestamp=self.timestamp[:end],
            weight=self.weight[:end],
        )
