"""A fixed-size ring of recent training examples: the online trainer's memory of the stream."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


class ReplayBuffer:
    """The ``capacity`` most recent examples: model user row, history (H,), positive item.

    Replaying them beside each micro-batch keeps the online steps from drifting toward whatever
    the last few minutes showed (catastrophic forgetting), at the cost of a bigger batch.
    """

    def __init__(self, capacity: int, history_length: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.users = np.zeros(capacity, dtype=np.int64)
        self.items = np.zeros(capacity, dtype=np.int64)
        self.histories = np.full((capacity, history_length), -1, dtype=np.int64)
        self._next = 0
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(
        self,
        users: npt.NDArray[np.int64],
        histories: npt.NDArray[np.int64],
        items: npt.NDArray[np.int64],
    ) -> None:
        """Append examples (n,), (n, H), (n,); the oldest are overwritten when full."""
        n = users.size
        if n > self.capacity:  # only the newest fit
            users, histories, items = (
                users[-self.capacity :],
                histories[-self.capacity :],
                items[-self.capacity :],
            )
            n = self.capacity
        slots = (self._next + np.arange(n)) % self.capacity
        self.users[slots], self.items[slots], self.histories[slots] = users, items, histories
        self._next = int((self._next + n) % self.capacity)
        self._size = min(self.capacity, self._size + n)

    def sample(
        self, n: int, rng: np.random.Generator
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """``n`` examples drawn uniformly with replacement (fewer if the buffer is empty)."""
        if self._size == 0 or n <= 0:
            return (
                np.empty(0, dtype=np.int64),
                np.empty((0, self.histories.shape[1]), dtype=np.int64),
                np.empty(0, dtype=np.int64),
            )
        rows = rng.integers(0, self._size, n)
        return self.users[rows], self.histories[rows], self.items[rows]
