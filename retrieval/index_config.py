"""What an ANN index is built as: the index kinds, :class:`IndexConfig` and FAISS factory strings.

:class:`~retrieval.index.VectorIndex` builds, searches and saves the index this module describes.

Kinds (``IndexConfig.kind``), with their FAISS factory string and memory per item at ``d`` dims:

========  ======================  ============  ============================================
kind      FAISS                   bytes / item  when
========  ======================  ============  ============================================
flat      ``IDMap,Flat``          4d + 8        exact; small catalogues, ground truth
ivf_flat  ``IVF{nlist},Flat``     4d + 8        exact scores of the probed items
ivf_fp16  ``IVF{nlist},SQfp16``   2d + 8        the default (see below)
hnsw      ``HNSW{M},Flat``        4d + ~8M + 8  low latency at high recall; no native
                                                removal; slow to build
ivf_pq    ``IVF{nlist},PQ{m}x8``  m + 8         huge catalogues in little RAM; lossy
sq8       ``IVF{nlist},SQ8``      d + 8         4x smaller than ivf_flat, small recall loss
========  ======================  ============  ============================================

Why the inverted-file kinds: they meet the retrieval target (recall@100 >= 0.95 and a top-500
single-query p99 <= 5 ms, 1M x 64 on 2 cores) with room to spare; they build several times faster
than HNSW; ``nprobe`` trades recall for latency at query time without a rebuild; and they support
add *and* remove natively, which the online item updates need. Why ``ivf_fp16`` is the default: a
search streams every probed vector from memory, and half-precision vectors halve those bytes, so
it searches faster than ``ivf_flat`` and finds nearly the same items (the scores differ in the
fourth significant digit; the sources re-score their candidates exactly from the float32
vectors). ``ivf_flat`` keeps float32 in the lists. ``sq8`` is the choice when memory binds: about
a quarter of ``ivf_flat``'s memory at a small recall loss. ``sq8`` and ``ivf_pq`` score compressed
vectors more coarsely; 16-byte PQ codes lose much recall on high-intrinsic-dimension vectors.
The figures: ``docs/benchmarks.md``, "ANN index kinds" (``benchmarks/bench_index.py``) and
"Measurements behind the defaults".
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal, get_args

from data.configuration import from_mapping
from data.errors import ConfigError, DataError
from data.validation import integer, non_negative_int, one_of, positive_int

IndexKind = Literal["flat", "ivf_flat", "ivf_fp16", "hnsw", "ivf_pq", "sq8"]
IVF_KINDS: tuple[IndexKind, ...] = ("ivf_flat", "ivf_fp16", "ivf_pq", "sq8")
# Kinds whose search returns exact inner products of float32 vectors.
EXACT_SCORE_KINDS: tuple[IndexKind, ...] = ("flat", "ivf_flat", "hnsw")

# FAISS's k-means warns below 39 training points per centroid: fewer give poorly placed centroids.
MIN_POINTS_PER_CENTROID = 39
# Auto nlist = NLIST_PER_SQRT_N * sqrt(n): the FAISS guidelines' 4*sqrt(n) .. 16*sqrt(n) range,
# at its cheap end, which balances the coarse search (nlist dot products) against list scans.
NLIST_PER_SQRT_N = 4.0
# Auto pq_m keeps at least this many dimensions per sub-quantizer (16 bytes per 64-d vector).
MIN_DIMS_PER_PQ_CODE = 4


@dataclass(frozen=True)
class IndexConfig:
    """How the ANN index is built and searched. Inner-product metric throughout.

    The defaults were chosen on ``benchmarks/bench_index.py`` (1M x 64 clustered unit vectors,
    top-500 single-query latency on 2 cores); its figures, the ``nprobe`` and ``ef_search``
    sweeps included, are in ``docs/benchmarks.md``, "ANN index kinds".

    kind: which structure (see the module docstring). Default ``"ivf_fp16"``: meets the target,
        searches faster than ``ivf_flat`` at the same recall, supports live add and remove
        natively.
    nlist: IVF cells; ``None`` = ``4 * sqrt(n)`` (4000 for 1M items), capped so that every
        centroid gets at least 39 training vectors.
    nprobe: IVF cells scanned per query (at most ``nlist``). 128 of 4000 cells (3%) clears the
        0.95 recall@100 target with a margin; 64 is too close to it to be a default, and 256
        buys a little recall for much more latency. Per-call overrides tune it without a rebuild.
    hnsw_m: HNSW graph degree (2M links per node on the base layer, 8 bytes of memory per item
        per unit of M). 32 is the usual choice for 64-d vectors.
    ef_construction: HNSW build beam width. 64 builds 1M vectors in minutes on 2 cores; a wider
        beam builds a better graph (higher recall at the same ef_search) at a linear cost.
    ef_search: HNSW search beam width; a search always uses ``max(ef_search, k)``, because FAISS
        returns at most ~ef_search results. 256: on the benchmark's high-intrinsic-dimension
        data, where graphs do worst, no beam width reaches the recall target (the IVF kinds do).
    pq_m: product-quantizer sub-vectors (bytes per vector at 8 bits); ``None`` = the largest
        divisor of ``dim`` not above ``dim / 4`` (16 for 64-d: 16x smaller than float32).
    pq_nbits: bits per PQ code (256 centroids at 8, the fast, standard layout).
    train_sample: at most this many vectors (a seeded sample) train the IVF centroids and the
        quantizers. 200k covers 39 points per centroid up to nlist ~5000 (10M+ items want
        more); the k-means cost is linear in it.
    seed: seeds the training sample and FAISS's k-means, so a rebuild of the IVF kinds is
        reproducible (HNSW's multi-threaded construction is not bit-for-bit reproducible).
    num_threads: OpenMP threads for FAISS calls on this index; ``None`` = FAISS's default (all
        cores). The setting is process-wide in OpenMP and is restored after each call. (TOML
        files and indexes saved before the rename may still call it ``threads``.)
    """

    renamed_keys: ClassVar[Mapping[str, str]] = MappingProxyType({"threads": "num_threads"})

    kind: IndexKind = "ivf_fp16"
    nlist: int | None = None
    nprobe: int = 128
    hnsw_m: int = 32
    ef_construction: int = 64
    ef_search: int = 256
    pq_m: int | None = None
    pq_nbits: int = 8
    train_sample: int = 200_000
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        one_of(self.kind, "IndexConfig.kind", get_args(IndexKind))
        for name in ("nprobe", "ef_construction", "ef_search", "train_sample"):
            positive_int(getattr(self, name), f"IndexConfig.{name}")
        integer(self.hnsw_m, "IndexConfig.hnsw_m", minimum=2)
        integer(self.pq_nbits, "IndexConfig.pq_nbits", minimum=1, maximum=16)
        non_negative_int(self.seed, "IndexConfig.seed")
        for name in ("nlist", "pq_m", "num_threads"):
            integer(getattr(self, name), f"IndexConfig.{name}", minimum=1, none_ok=True)

    def resolved_nlist(self, n: int, n_train: int | None = None) -> int:
        """IVF cells for ``n`` items trained on ``n_train`` of them (default: all; the explicit
        ``nlist`` when set)."""
        if self.nlist is not None:
            return self.nlist
        n_train = min(n, self.train_sample) if n_train is None else n_train
        auto = round(NLIST_PER_SQRT_N * math.sqrt(n))
        return max(1, min(auto, n_train // MIN_POINTS_PER_CENTROID))

    def resolved_pq_m(self, dim: int) -> int:
        """PQ sub-vectors for ``dim``-dimensional vectors (the explicit ``pq_m`` when set)."""
        if self.pq_m is not None:
            return self.pq_m
        return max(m for m in range(1, dim + 1) if dim % m == 0 and m * MIN_DIMS_PER_PQ_CODE <= dim)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict; :meth:`from_dict` inverts it exactly."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> IndexConfig:
        """Build from a dict (a TOML table or ``index.json``); unknown keys raise ConfigError."""
        return from_mapping(cls, values, "IndexConfig")


def factory_string(config: IndexConfig, *, n: int, dim: int, n_train: int) -> str:
    """The ``faiss.index_factory`` description of ``config`` for ``n`` x ``dim`` vectors."""
    if config.kind == "flat":
        return "IDMap,Flat"
    if config.kind == "hnsw":
        return f"HNSW{config.hnsw_m},Flat"
    nlist = config.resolved_nlist(n, n_train)
    if n_train < nlist:
        raise DataError(
            f"{config.kind} index with nlist={nlist} needs at least {nlist} training vectors, "
            f"got {n_train}"
        )
    if config.kind == "ivf_flat":
        return f"IVF{nlist},Flat"
    if config.kind == "ivf_fp16":
        return f"IVF{nlist},SQfp16"
    if config.kind == "sq8":
        return f"IVF{nlist},SQ8"
    pq_m = config.resolved_pq_m(dim)
    if dim % pq_m:
        raise ConfigError(f"IndexConfig.pq_m={pq_m} does not divide the dim {dim}")
    if n_train < 2**config.pq_nbits:
        raise DataError(
            f"ivf_pq with pq_nbits={config.pq_nbits} needs at least {2**config.pq_nbits} "
            f"training vectors, got {n_train}"
        )
    return f"IVF{nlist},PQ{pq_m}x{config.pq_nbits}"
