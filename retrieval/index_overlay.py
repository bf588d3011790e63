"""Live changes on top of a memory-mapped (read-only) FAISS index.

A served bundle maps its index read-only, so that every worker of a machine shares one copy
through the page cache; FAISS cannot add to or remove from a mapped index (resizing a mapped
vector aborts the process). New and changed items still have to become retrievable between
retrains, so a read-only :class:`~retrieval.index.VectorIndex` keeps its changes here, in
private memory: a small exact index of the items added since it was loaded (the *delta*), and
the set of base ids that a removal or a replacement *hides*. A search asks the base with the
hidden ids filtered out (an ``IDSelector``) and the delta, and merges the two by score.

The delta is flat (exact): new items between two retrains are few, so scanning them costs less
than any structure, and they are never less findable than the indexed ones. A retrain folds them
into a new base.
"""

from __future__ import annotations

import copy
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

IdArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


class LiveOverlay:
    """The delta index and the hidden base ids of one read-only index.

    An immutable value: every change returns a new overlay, and the index swaps its reference in
    one assignment, so a search running in another thread keeps a consistent snapshot (FAISS
    indexes must not change under a search).

    base_ids: every id the base holds (sorted); only hidden ids that the base really holds
        count as removed from it.
    """

    def __init__(self, dim: int, base_ids: IdArray) -> None:
        self.base_ids = np.unique(base_ids)
        self.hidden: IdArray = np.empty(0, dtype=np.int64)
        self.delta: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        # The filter handed to base searches; None while nothing is hidden. FAISS holds raw
        # pointers: the inner selector must live as long as the outer one.
        self._inner: Any = None
        self.selector: Any = None

    @property
    def n_hidden(self) -> int:
        return int(self.hidden.size)

    @property
    def n_delta(self) -> int:
        return int(self.delta.ntotal)

    def hiding(self, ids: IdArray) -> tuple[LiveOverlay, int]:
        """An overlay that also hides the base entries of ``ids``, and how many of them were
        live in the base."""
        in_base = np.isin(ids, self.base_ids) & ~np.isin(ids, self.hidden)
        newly = np.unique(ids[in_base])
        if newly.size == 0:
            return self, 0
        changed = copy.copy(self)
        changed.hidden = np.union1d(self.hidden, newly)
        changed._inner = faiss.IDSelectorBatch(changed.hidden.size, faiss.swig_ptr(changed.hidden))
        changed.selector = faiss.IDSelectorNot(changed._inner)
        return changed, int(newly.size)

    def adding(self, vectors: FloatArray, ids: IdArray) -> LiveOverlay:
        """An overlay whose delta also holds ``ids`` (replacing their earlier delta vectors)."""
        changed = copy.copy(self)
        changed.delta = faiss.clone_index(self.delta)
        changed.delta.remove_ids(ids)
        changed.delta.add_with_ids(vectors, ids)
        return changed

    def removing(self, ids: IdArray) -> tuple[LiveOverlay, int]:
        """An overlay whose delta no longer holds ``ids``, and how many it held."""
        changed = copy.copy(self)
        changed.delta = faiss.clone_index(self.delta)
        return changed, int(changed.delta.remove_ids(ids))

    def search(self, queries: FloatArray, k: int) -> tuple[IdArray, FloatArray]:
        """Exact top-``k`` of the delta: (m, min(k, n_delta)) ids and scores."""
        fetch = min(k, self.n_delta)
        scores, ids = self.delta.search(queries, fetch)
        return ids, scores


def merge_results(
    first: tuple[IdArray, FloatArray], second: tuple[IdArray, FloatArray], k: int
) -> tuple[IdArray, FloatArray]:
    """Per row, the ``k`` best of two disjoint result lists: (m, k) ids, -1 / -inf padded."""
    ids = np.concatenate([first[0], second[0]], axis=1)
    scores = np.concatenate([first[1], second[1]], axis=1)
    scores = np.where(ids >= 0, scores, -np.inf).astype(np.float32)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1)
    top_ids[~np.isfinite(top_scores)] = -1
    m, width = top_ids.shape
    if width < k:  # both lists together are shorter than k
        top_ids = np.concatenate([top_ids, np.full((m, k - width), -1, np.int64)], axis=1)
        top_scores = np.concatenate(
            [top_scores, np.full((m, k - width), -np.inf, np.float32)], axis=1
        )
    return top_ids, top_scores


def base_ids(index: Any, kind: str, labels: IdArray, alive: npt.NDArray[np.bool_]) -> IdArray:
    """Every id a (possibly memory-mapped) FAISS index of ``kind`` holds, read without writing.

    hnsw: our own ``labels`` of the live positions; flat: the ``IndexIDMap``'s id table; the IVF
    kinds: the ids of every inverted list.
    """
    if kind == "hnsw":
        return np.asarray(labels)[np.asarray(alive)]
    if kind == "flat":
        return faiss.vector_to_array(index.id_map).astype(np.int64)
    ivf: Any = faiss.extract_index_ivf(index)
    lists = ivf.invlists
    chunks = []
    for list_no in range(ivf.nlist):
        size = int(lists.list_size(list_no))
        if size:
            pointer = lists.get_ids(list_no)
            chunks.append(faiss.rev_swig_ptr(pointer, size).astype(np.int64))  # a copy
            lists.release_ids(list_no, pointer)
    return np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)
