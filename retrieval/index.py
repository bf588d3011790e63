"""Approximate nearest-neighbour (ANN) index over item vectors, with live add and remove (FAISS).

The two-tower model writes L2-normalised item vectors; retrieval asks for the ``k`` items whose
vectors have the largest inner product (= cosine similarity) with a user vector. A
:class:`VectorIndex` answers that question in milliseconds for millions of items, returns *our*
item indices directly (no second id lookup), and keeps up with the catalogue between retrains:
new items are added and retired items removed while it serves.

The kinds and how each is built: ``retrieval/index_config.py``.

Ids: the IVF kinds store our ids in their inverted lists, and ``flat`` wraps the flat index in
``IndexIDMap`` (not ``IndexIDMap2``: its reverse map only serves ``reconstruct``, which this
design never calls, and costs a hash map entry per item). HNSW in FAISS cannot remove vectors, so
the ``hnsw`` kind keeps its own position -> id array and an *alive* mask: a removed or replaced
entry becomes a tombstone that the graph search skips (``IDSelectorBitmap``; it still routes the
search, so results stay ``k`` long), and :meth:`VectorIndex.compact` rebuilds the graph without
tombstones. Compact when tombstones pass a few percent of the index: they cost memory and search
time, and a graph with many of them finds fewer of the live neighbours.

A memory-mapped index (``load(mmap=True)``, how a served bundle is loaded) is shared by every
worker through the page cache and cannot change in place; its live adds and removes go to a
private overlay (``retrieval/index_overlay.py``): an exact index of the added items, merged into
every search, and a search-time filter that hides removed or replaced base items.

The approximate index is always measured against exact search: :func:`exact_search` is the
brute-force reference and :func:`ann_recall` the recall of an index against it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import numpy.typing as npt

from data.errors import BundleError, ConfigError, DataError
from data.validation import integer, positive_int
from retrieval.index_config import (
    EXACT_SCORE_KINDS,
    IVF_KINDS,
    IndexConfig,
    IndexKind,
    factory_string,
)
from retrieval.index_overlay import LiveOverlay, base_ids, merge_results

IdArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]

FORMAT_VERSION = 1
INDEX_FILE = "index.faiss"
META_FILE = "index.json"
LABELS_FILE = "hnsw_labels.npy"
ALIVE_FILE = "hnsw_alive.npy"


@contextmanager
def _omp_threads(threads: int | None) -> Iterator[None]:
    """Run FAISS with ``threads`` OpenMP threads (``None``: leave FAISS's default alone)."""
    if threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


class VectorIndex:
    """An inner-product ANN index whose search returns item indices (our ids), not positions.

    Build with :meth:`build`, or :meth:`load` a saved one. ``search`` is batch-first: a single
    request is a batch of one. ``add`` and ``remove`` update the index in place while it serves
    (not concurrently with a search: callers serialise writers, e.g. swap a copy or lock).
    """

    def __init__(
        self,
        config: IndexConfig,
        index: Any,
        *,
        labels: IdArray | None = None,
        alive: npt.NDArray[np.bool_] | None = None,
        read_only: bool = False,
    ) -> None:
        """Wrap a built FAISS index; use :meth:`build` or :meth:`load` rather than this.

        labels, alive: ``hnsw`` only, (ntotal,) our id and liveness of each graph position.
        read_only: the index is memory-mapped: ``add`` and ``remove`` go to a private overlay
            (``retrieval/index_overlay.py``); ``compact`` and saving those changes raise.
        """
        self.config = config
        # Any: FAISS's bundled stubs type every index as the base class and miss the Python
        # wrappers' numpy signatures (remove_ids(array), IVF/HNSW attributes).
        self._index: Any = index
        self._read_only = read_only
        # hnsw only (empty for the other kinds, whose FAISS index keeps ids and deletes).
        self._labels: IdArray = np.empty(0, np.int64) if labels is None else labels
        self._alive: npt.NDArray[np.bool_] = np.empty(0, bool) if alive is None else alive
        n = int(index.ntotal)
        if config.kind == "hnsw" and (self._labels.shape != (n,) or self._alive.shape != (n,)):
            raise BundleError(
                f"hnsw index holds {n} vectors but {self._labels.shape[0]} labels and "
                f"{self._alive.shape[0]} alive flags"
            )
        # Kept up to date by every change of the alive mask: len() is on the search path.
        self._n_tombstones = int(self._alive.size - np.count_nonzero(self._alive))
        self._bitmap: npt.NDArray[np.uint8] | None = None
        self._selector: faiss.IDSelectorBitmap | None = None
        self._refresh_selector()
        # Read-only indexes only, from their first change: what changed since loading.
        self._overlay: LiveOverlay | None = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(cls, config: IndexConfig, vectors: npt.ArrayLike, ids: npt.ArrayLike) -> VectorIndex:
        """Build an index of ``vectors`` (n, d) float32 labelled by ``ids`` (n,) int64 >= 0.

        ``ids`` are our item indices, unique; ``search`` returns them. The IVF kinds train their
        centroids (and quantizers) on a seeded sample of at most ``config.train_sample`` vectors,
        so they need at least ``nlist`` vectors (and ``2**pq_nbits`` for ``ivf_pq``).
        """
        matrix = _as_vectors(vectors, dim=None, name="vectors")
        labels = _as_ids(ids, n=matrix.shape[0], name="ids")
        n, dim = matrix.shape
        kind = config.kind
        factory = factory_string(config, n=n, dim=dim, n_train=min(n, config.train_sample))
        index: Any = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
        with _omp_threads(config.num_threads):
            if kind in IVF_KINDS:
                index.cp.seed = config.seed  # k-means of the IVF centroids
                if kind == "ivf_pq":
                    index.pq.cp.seed = config.seed  # k-means of the PQ codebooks
                    # The factory turns on polysemous training (an annealing that reorders the
                    # codebook for Hamming pre-filtering); search never uses that filter here.
                    index.do_polysemous_training = False
                index.train(_training_sample(matrix, config.train_sample, config.seed))
                index.add_with_ids(matrix, labels)
            elif kind == "hnsw":
                index.hnsw.efConstruction = config.ef_construction
                index.add(matrix)
            else:
                index.add_with_ids(matrix, labels)
        if kind == "hnsw":
            return cls(config, index, labels=labels.copy(), alive=np.ones(n, dtype=bool))
        return cls(config, index)

    # ------------------------------------------------------------------ properties

    @property
    def kind(self) -> IndexKind:
        """The structure, as in ``config.kind``."""
        return self.config.kind

    @property
    def dim(self) -> int:
        """Vector width ``d``."""
        return int(self._index.d)

    @property
    def read_only(self) -> bool:
        """True when loaded with ``mmap=True``: searchable, shared, not modifiable."""
        return self._read_only

    @property
    def n_tombstones(self) -> int:
        """Removed ``hnsw`` entries still in the graph (0 for the other kinds); see compact."""
        return self._n_tombstones

    def refine_depth(self, k: int) -> int:
        """How many results to ask for to keep the exact top ``k`` after scoring them again
        from full-precision vectors: ``k`` for the kinds that store float32 vectors, ~10% more
        (at least 8) for the compressed ones, so that items whose compressed score fell just
        below the k-th one are still found."""
        if self.kind in EXACT_SCORE_KINDS:
            return k
        return k + max(8, math.ceil(k / 10))

    def __len__(self) -> int:
        """Number of live items (tombstones and hidden overlay entries excluded)."""
        live = int(self._index.ntotal) - self.n_tombstones
        if self._overlay is not None:
            live += self._overlay.n_delta - self._overlay.n_hidden
        return live

    def __repr__(self) -> str:
        return (
            f"VectorIndex(kind={self.kind!r}, dim={self.dim}, items={len(self)}, "
            f"tombstones={self.n_tombstones}, read_only={self.read_only})"
        )

    def serialized_bytes(self) -> int:
        """Size of the saved index in bytes (FAISS index + id arrays), ~ its resident memory."""
        size = int(faiss.serialize_index(self._index).size)
        if self.kind == "hnsw":
            size += self._labels.nbytes + self._alive.nbytes
        return size

    # ------------------------------------------------------------------ search

    def search(
        self,
        queries: npt.ArrayLike,
        k: int,
        *,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[IdArray, FloatArray]:
        """The ``k`` items with the largest inner product for each query.

        queries: (m, d) float32 (one request = a batch of one).
        nprobe, ef_search: per-call overrides of the config's search knobs (tuning sweeps,
            per-request latency budgets); ignored by kinds that do not use them.
        Returns ``ids`` (m, k) int64 item ids, -1 padded at the end of a row, no duplicates in
        a row, and ``scores`` (m, k) float32, non-increasing along a row, -inf at padding. An
        approximate index may return fewer than ``k`` items even when more exist (an IVF row
        whose probed cells hold fewer than ``k`` items); exact ``flat`` pads only when ``k`` is
        larger than the index.
        """
        matrix = _as_vectors(queries, dim=self.dim, name="queries")
        k = _check_k(k)
        m = matrix.shape[0]
        ids = np.full((m, k), -1, dtype=np.int64)
        scores = np.full((m, k), -np.inf, dtype=np.float32)
        # Ask FAISS for at most ntotal results: k far beyond the index would only allocate padding.
        fetch = min(k, int(self._index.ntotal))
        if m == 0 or fetch == 0 or len(self) == 0:
            return ids, scores
        overlay = self._overlay  # one snapshot for the whole search (changes swap it)
        params = self._search_params(fetch, overlay, nprobe=nprobe, ef_search=ef_search)
        with _omp_threads(self.config.num_threads):
            found_scores, found = self._index.search(matrix, fetch, params=params)
        if self.kind == "hnsw":
            found = np.where(found >= 0, self._labels[np.maximum(found, 0)], -1)
        found_scores[found < 0] = -np.inf
        ids[:, :fetch] = found
        scores[:, :fetch] = found_scores
        if overlay is not None and overlay.n_delta:
            return merge_results((ids, scores), overlay.search(matrix, k), k)
        return ids, scores

    def _search_params(
        self,
        fetch: int,
        overlay: LiveOverlay | None = None,
        *,
        nprobe: int | None,
        ef_search: int | None,
    ) -> faiss.SearchParameters | None:
        # Base ids a read-only index has hidden (removed or replaced since loading).
        hidden = None if overlay is None else overlay.selector
        if self.kind in IVF_KINDS:
            probes = self.config.nprobe if nprobe is None else _check_knob("nprobe", nprobe)
            ivf_params = faiss.SearchParametersIVF()
            ivf_params.nprobe = probes
            if hidden is not None:
                ivf_params.sel = hidden
            return ivf_params
        if self.kind == "hnsw":
            beam = (
                self.config.ef_search if ef_search is None else _check_knob("ef_search", ef_search)
            )
            # FAISS does not widen the beam to k by itself: a beam of 16 returns ~16 results.
            hnsw_params = faiss.SearchParametersHNSW()  # type: ignore[attr-defined]  # not in stubs
            hnsw_params.efSearch = max(beam, fetch)
            if self._selector is not None:
                hnsw_params.sel = self._selector
            return hnsw_params
        if hidden is not None:
            flat_params = faiss.SearchParameters()
            flat_params.sel = hidden
            return flat_params
        return None

    # ------------------------------------------------------------------ live updates

    def add(self, vectors: npt.ArrayLike, ids: npt.ArrayLike) -> None:
        """Add items (new items of the catalogue); an id already in the index is replaced.

        vectors: (n, d) float32; ids: (n,) int64 >= 0, unique within the call. A read-only
        (memory-mapped) index keeps them in its private overlay.
        """
        matrix = _as_vectors(vectors, dim=self.dim, name="vectors")
        labels = _as_ids(ids, n=matrix.shape[0], name="ids")
        if labels.size == 0:
            return
        if self._read_only:
            if self.kind == "hnsw":
                self._kill(labels)
                self._refresh_selector()
                self._overlay = self._live_overlay().adding(matrix, labels)
            else:
                hidden, _ = self._live_overlay().hiding(labels)
                self._overlay = hidden.adding(matrix, labels)  # one swap: never half-changed
            return
        with _omp_threads(self.config.num_threads):
            if self.kind == "hnsw":
                self._kill(labels)
                self._index.add(matrix)
                self._labels = np.concatenate([self._labels, labels])
                self._alive = np.concatenate([self._alive, np.ones(labels.size, dtype=bool)])
                self._refresh_selector()
            else:
                # Replace = remove + add; removing an absent id is a no-op.
                self._index.remove_ids(labels)
                self._index.add_with_ids(matrix, labels)

    def remove(self, ids: npt.ArrayLike) -> int:
        """Remove items (retired from the catalogue); absent ids are ignored.

        ids: (n,) int64. Returns how many items were removed. For ``hnsw`` the entries become
        tombstones that search skips; :meth:`compact` frees them.
        """
        labels = np.unique(_as_ids(ids, n=None, name="ids", unique=False))
        if labels.size == 0:
            return 0
        if self._read_only:
            # Live in the base or in the overlay, never both: add hides the base's copy.
            overlay, removed = self._live_overlay().removing(labels)
            if self.kind == "hnsw":
                removed += self._kill(labels)
                self._refresh_selector()
            else:
                overlay, hidden = overlay.hiding(labels)
                removed += hidden
            self._overlay = overlay
            return removed
        with _omp_threads(self.config.num_threads):
            if self.kind == "hnsw":
                removed = self._kill(labels)
                self._refresh_selector()
                return removed
            return int(self._index.remove_ids(labels))

    def compact(self) -> None:
        """Rebuild an ``hnsw`` graph without its tombstones (a no-op for the other kinds).

        The other kinds delete physically on :meth:`remove`. The graph is rebuilt from the exact
        float32 vectors HNSW stores, so no live vector is lost or altered (the new graph differs,
        as any rebuild's does). Costs a build of ``len(self)`` items (minutes per million on 2
        cores: the hnsw build time in ``docs/benchmarks.md``).
        """
        self._check_writable("compact")
        if self.kind != "hnsw" or self.n_tombstones == 0:
            return
        storage: Any = faiss.downcast_index(self._index.storage)
        stored = faiss.rev_swig_ptr(storage.get_xb(), int(storage.ntotal) * self.dim)
        vectors = stored.reshape(-1, self.dim)[self._alive]  # a copy: the old index goes away
        fresh: Any = faiss.index_factory(
            self.dim, f"HNSW{self.config.hnsw_m},Flat", faiss.METRIC_INNER_PRODUCT
        )
        fresh.hnsw.efConstruction = self.config.ef_construction
        with _omp_threads(self.config.num_threads):
            fresh.add(vectors)
        self._index = fresh
        self._labels = self._labels[self._alive]
        self._alive = np.ones(self._labels.size, dtype=bool)
        self._n_tombstones = 0
        self._refresh_selector()

    def _live_overlay(self) -> LiveOverlay:
        if self._overlay is None:
            self._overlay = LiveOverlay(
                self.dim, base_ids(self._index, self.kind, self._labels, self._alive)
            )
        return self._overlay

    def _kill(self, labels: IdArray) -> int:
        """Tombstone the live hnsw positions holding ``labels``; return how many."""
        hit = self._alive & np.isin(self._labels, labels)
        killed = int(np.count_nonzero(hit))
        self._alive = self._alive & ~hit
        self._n_tombstones += killed
        return killed

    def _refresh_selector(self) -> None:
        """Rebuild the search-time filter that hides hnsw tombstones (None when there are none)."""
        self._selector = None
        self._bitmap = None
        if self._n_tombstones:
            # FAISS reads bit i of the bitmap as (bitmap[i >> 3] >> (i & 7)) & 1: little-endian.
            self._bitmap = np.packbits(self._alive, bitorder="little")
            # The selector points into the bitmap's memory; self._bitmap keeps that memory alive.
            self._selector = faiss.IDSelectorBitmap(self._bitmap.size, faiss.swig_ptr(self._bitmap))

    def _check_writable(self, operation: str) -> None:
        if self._read_only:
            # FAISS aborts the process when it resizes a memory-mapped vector: refuse first.
            raise ConfigError(
                f"cannot {operation}: the index was loaded with mmap=True and is read-only; "
                "load it with mmap=False to modify it"
            )

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> None:
        """Write ``index.faiss`` (FAISS's own format), ``index.json`` and, for hnsw, the ids.

        A memory-mapped index changed since loading cannot be saved (its changes live in a
        private overlay); the next training run writes them into a new index.
        """
        if self._overlay is not None:
            raise ConfigError(
                "cannot save a memory-mapped index with live changes; "
                "load it with mmap=False to edit and save it"
            )
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(path / INDEX_FILE))
        if self.kind == "hnsw":
            np.save(path / LABELS_FILE, np.asarray(self._labels), allow_pickle=False)
            np.save(path / ALIVE_FILE, np.asarray(self._alive), allow_pickle=False)
        meta = {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "dim": self.dim,
            "ntotal": int(self._index.ntotal),
        }
        (path / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path, *, mmap: bool = False) -> VectorIndex:
        """Read an index written by :meth:`save`.

        mmap: map the vectors, graph and inverted lists from the file instead of reading them
            into memory, so several serving workers on one machine share one copy through the
            page cache; the result is read-only. (FAISS's ``IO_FLAG_MMAP_IFC`` maps flat codes,
            HNSW graphs and IVF lists alike; the older ``IO_FLAG_MMAP`` maps IVF lists only.)
        """
        path = Path(directory)
        meta_path, index_path = path / META_FILE, path / INDEX_FILE
        for required in (meta_path, index_path):
            if not required.is_file():
                raise BundleError(f"index directory {path} has no {required.name}")
        try:
            meta = json.loads(meta_path.read_text())
            version = meta["format_version"]
            config = IndexConfig.from_dict(meta["config"])
        except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as error:
            raise BundleError(f"{meta_path} is not a valid index description: {error}") from error
        if version != FORMAT_VERSION:
            raise BundleError(
                f"{meta_path} has format_version {version}, this code reads {FORMAT_VERSION}"
            )
        flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0
        index = faiss.read_index(str(index_path), flags)
        if index.d != meta.get("dim") or index.ntotal != meta.get("ntotal"):
            raise BundleError(
                f"{index_path} holds {index.ntotal} x {index.d} vectors but {meta_path} says "
                f"{meta.get('ntotal')} x {meta.get('dim')}"
            )
        if config.kind != "hnsw":
            return cls(config, index, read_only=mmap)
        mode: Literal["r"] | None = "r" if mmap else None
        try:
            labels = np.load(path / LABELS_FILE, mmap_mode=mode, allow_pickle=False)
            alive = np.load(path / ALIVE_FILE, mmap_mode=mode, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise BundleError(f"cannot read the hnsw id arrays in {path}: {error}") from error
        return cls(config, index, labels=labels, alive=alive, read_only=mmap)


# ---------------------------------------------------------------------- exact search and recall


def exact_search(
    vectors: npt.ArrayLike, ids: npt.ArrayLike, queries: npt.ArrayLike, k: int
) -> tuple[IdArray, FloatArray]:
    """Brute-force top-``k`` by inner product: the ground truth an ANN index is measured against.

    vectors: (n, d) float32; ids: (n,) int64; queries: (m, d) float32. Returns ``(ids, scores)``
    of shape (m, k) as :meth:`VectorIndex.search` does (-1 / -inf padding when ``k > n``).
    """
    matrix = _as_vectors(vectors, dim=None, name="vectors")
    labels = _as_ids(ids, n=matrix.shape[0], name="ids")
    query_matrix = _as_vectors(queries, dim=matrix.shape[1], name="queries")
    k = _check_k(k)
    m = query_matrix.shape[0]
    out_ids = np.full((m, k), -1, dtype=np.int64)
    out_scores = np.full((m, k), -np.inf, dtype=np.float32)
    fetch = min(k, matrix.shape[0])
    if m == 0 or fetch == 0:
        return out_ids, out_scores
    # faiss.knn: blocked BLAS products with a heap per query, no index copy of the vectors.
    scores, positions = faiss.knn(query_matrix, matrix, fetch, metric=faiss.METRIC_INNER_PRODUCT)
    out_ids[:, :fetch] = labels[positions]
    out_scores[:, :fetch] = scores
    return out_ids, out_scores


def recall_at_k(approx_ids: npt.ArrayLike, exact_ids: npt.ArrayLike) -> float:
    """Mean over rows of |approx ∩ exact| / |exact|, ignoring -1 padding.

    approx_ids, exact_ids: (m, k) int64, rows free of duplicates (as ``search`` and
    ``exact_search`` guarantee). With ``k <= n`` the denominator is ``k``: recall@k.
    """
    approx = np.asarray(approx_ids, dtype=np.int64)
    exact = np.asarray(exact_ids, dtype=np.int64)
    if approx.ndim != 2 or approx.shape != exact.shape:
        raise DataError(
            f"approx ids {approx.shape} and exact ids {exact.shape} must be equal (m, k)"
        )
    truth = np.count_nonzero(exact >= 0, axis=1)
    if not truth.any():
        raise DataError("recall is undefined: the exact result holds no ids")
    m, k = exact.shape
    rows = np.repeat(np.arange(m), k)
    keep_a, keep_e = approx.ravel() >= 0, exact.ravel() >= 0
    row = np.concatenate([rows[keep_a], rows[keep_e]])
    item = np.concatenate([approx.ravel()[keep_a], exact.ravel()[keep_e]])
    # Rows hold no duplicates, so an (row, id) pair seen twice is an id found by both.
    order = np.lexsort((item, row))
    row, item = row[order], item[order]
    both = (row[1:] == row[:-1]) & (item[1:] == item[:-1])
    hits = np.bincount(row[1:][both], minlength=m)
    defined = truth > 0
    return float(np.mean(hits[defined] / truth[defined]))


def ann_recall(
    index: VectorIndex,
    vectors: npt.ArrayLike,
    ids: npt.ArrayLike,
    queries: npt.ArrayLike,
    k: int,
) -> float:
    """Recall@k of ``index`` against exact search over ``(vectors, ids)``, in [0, 1].

    ``vectors``/``ids`` must be the items the index currently holds.
    """
    exact, _ = exact_search(vectors, ids, queries, k)
    approx, _ = index.search(queries, k)
    return recall_at_k(approx, exact)


# ---------------------------------------------------------------------- input checks


def _as_vectors(values: npt.ArrayLike, *, dim: int | None, name: str) -> FloatArray:
    """``values`` as a C-contiguous float32 (n, dim) matrix, or DataError naming what is wrong."""
    array = np.asarray(values)
    if array.ndim != 2:
        raise DataError(
            f"{name} must be a 2-D (n, d) array, got shape {array.shape}"
            + (" (use .reshape(1, -1) for one vector)" if array.ndim == 1 else "")
        )
    if not np.issubdtype(array.dtype, np.floating):
        raise DataError(f"{name} must hold floating-point numbers, got dtype {array.dtype}")
    if dim is None and array.shape[1] == 0:
        raise DataError(f"{name} have zero dimensions (shape {array.shape})")
    if dim is not None and array.shape[1] != dim:
        raise DataError(f"{name} have {array.shape[1]} dimensions, the index has {dim}")
    matrix = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise DataError(
            f"{name} have {bad.size} row(s) with NaN or infinite values, first at row {bad[0]}"
        )
    return matrix


def _as_ids(values: npt.ArrayLike, *, n: int | None, name: str, unique: bool = True) -> IdArray:
    """``values`` as (n,) int64 ids >= 0 (unique unless told), or DataError."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{name} must be integers, got dtype {array.dtype}")
    if n is not None and array.shape[0] != n:
        raise DataError(f"{array.shape[0]} {name} for {n} vectors")
    labels = np.ascontiguousarray(array, dtype=np.int64)
    if labels.size and labels.min() < 0:
        raise DataError(f"{name} must be >= 0 (-1 is the padding id), got {labels.min()}")
    if unique and labels.size:
        ordered = np.sort(labels)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if repeated.size:
            raise DataError(f"{name} must be unique, {np.unique(repeated)[:5].tolist()} repeat")
    return labels


def _check_k(k: int) -> int:
    k = integer(k, "k", error=DataError)
    if k < 1:
        raise DataError(f"k must be a positive integer, got {k!r}")
    return k


def _check_knob(name: str, value: int) -> int:
    return positive_int(value, name, error=DataError)


def _training_sample(matrix: FloatArray, size: int, seed: int) -> FloatArray:
    """At most ``size`` rows of ``matrix``, a seeded uniform sample (all rows when fewer)."""
    if matrix.shape[0] <= size:
        return matrix
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(matrix.shape[0], size=size, replace=False))
    return matrix[rows]
