"""K-means pseudo-labels: preprocessing, faiss K-means, empty-cluster repair and diagnostics.

Pure functions, no Ray: the K-means service (`kmeans_service.py`) and any later distributed mode
call `fit_clusters`. Everything is float32 on the way in and out; statistics are float64 inside.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass

import faiss
import numpy as np

from data_prep.config import require, require_choice

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class ClusteringConfig:
    num_clusters: int = 10
    iterations: int = 20
    # PCA to this many dimensions before K-means; None keeps every dimension.
    pca_dim: int | None = 256
    # Scale each principal direction to unit variance (DeepCluster's PCA whitening).
    whiten: bool = True
    l2_normalize: bool = True
    # Floor on the eigenvalues used for whitening, relative to the largest one: a dead ReLU
    # dimension has eigenvalue 0 and would otherwise be divided by 0 (NaN / inf).
    eigen_floor: float = 1e-5
    # faiss trains on at most 256 points per centroid by default and silently drops the rest
    # (K = 10: 2,560 points). None trains on every point; an int restores faiss's subsampling.
    max_points_per_centroid: int | None = None
    seed: int = 0  # K-means uses seed + epoch: a new initialisation every epoch, reproducible
    use_gpu: bool | str = "auto"  # "auto": GPU when faiss sees one; False: always CPU
    threads: int | None = None  # faiss OpenMP threads; None: the CPUs this process may use

    def __post_init__(self) -> None:
        require(self.num_clusters >= 1, "num_clusters", "must be >= 1")
        require(self.iterations >= 1, "iterations", "must be >= 1")
        require(self.pca_dim is None or self.pca_dim >= 1, "pca_dim", "must be >= 1 or null")
        require(self.eigen_floor > 0, "eigen_floor", "must be > 0")
        mppc = self.max_points_per_centroid
        require(mppc is None or mppc >= 1, "max_points_per_centroid", "must be >= 1 or null")
        require_choice(self.use_gpu, "use_gpu", (True, False, "auto"))
        require(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null")


@dataclass(frozen=True)
class Preprocessor:
    """x -> ((x - mean) @ projection), then rows scaled to unit L2 norm (zero rows stay zero)."""

    mean: np.ndarray | None  # (d,) float32, None: no centring and no projection
    projection: np.ndarray | None  # (d, d') float32, whitening scales folded in
    l2_normalize: bool

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.mean is not None and self.projection is not None:
            x = (x - self.mean) @ self.projection
        if self.l2_normalize:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.maximum(norms, np.float32(1e-12))
        return np.ascontiguousarray(x, dtype=np.float32)


def fit_preprocessor(x: np.ndarray, config: ClusteringConfig | None = None) -> Preprocessor:
    """PCA to `pca_dim` (whitened with an eigenvalue floor) then L2 normalisation, per `config`.

    With `pca_dim=None` and `whiten=False` there is no projection at all (only L2, if on).
    """
    config = config or ClusteringConfig()
    if config.pca_dim is None and not config.whiten:
        return Preprocessor(mean=None, projection=None, l2_normalize=config.l2_normalize)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected a non-empty (n, d) array, got shape {x.shape}")
    mean = x.mean(axis=0, dtype=np.float64)
    cov, centre = np.zeros((x.shape[1], x.shape[1])), mean.astype(np.float32)
    for start in range(0, len(x), 65_536):  # float32 products summed in float64, bounded memory
        block = x[start : start + 65_536] - centre
        cov += block.T @ block
    cov /= max(len(x) - 1, 1)
    eigenvalues, eigenvectors = np.linalg.eigh(cov)  # ascending
    keep = min(config.pca_dim or x.shape[1], x.shape[1])
    eigenvalues, eigenvectors = eigenvalues[::-1][:keep], eigenvectors[:, ::-1][:, :keep]
    projection = eigenvectors
    if config.whiten:
        largest = max(float(eigenvalues[0]), 0.0)
        floor = config.eigen_floor * largest if largest > 0 else 1.0
        projection = eigenvectors / np.sqrt(np.maximum(eigenvalues, floor))
    return Preprocessor(
        mean=mean.astype(np.float32),
        projection=np.ascontiguousarray(projection, dtype=np.float32),
        l2_normalize=config.l2_normalize,
    )


@dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # (K, d') float32
    assignments: np.ndarray  # (N,) int64, every cluster non-empty (see reseeded)
    objective: float  # sum of squared distances of the points to their centroid, final labels
    cluster_sizes: np.ndarray  # (K,) int64
    iterations: int
    reseeded: int  # clusters still empty after K-means and re-seeded by `_reseed_empty`
    seed: int
    seconds: float


def faiss_threads(config: ClusteringConfig) -> int:
    """faiss threads: `config.threads`, else the CPUs this process may run on (not the host's)."""
    if config.threads is not None:
        return config.threads
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def use_faiss_gpu(config: ClusteringConfig) -> bool:
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if config.use_gpu is True and gpus == 0:
        log.warning("use_gpu=True but faiss sees no GPU: K-means runs on the CPU")
    return config.use_gpu is not False and gpus > 0


def run_kmeans(x: np.ndarray, config: ClusteringConfig, epoch: int) -> KMeansResult:
    """faiss K-means on every row of `x` (float32, (N, d)) with seed `config.seed + epoch`."""
    started = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = config.num_clusters
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"K-means needs an (N, d) array with N >= K = {k}, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("K-means input holds NaN or inf")
    faiss.omp_set_num_threads(faiss_threads(config))
    # faiss subsamples when N > K * max_points_per_centroid; ceil(N / K) makes that never true.
    mppc = config.max_points_per_centroid or max(math.ceil(len(x) / k), 1)
    seed = config.seed + epoch
    kmeans = faiss.Kmeans(
        x.shape[1], k, niter=config.iterations, seed=seed, max_points_per_centroid=mppc,
        gpu=use_faiss_gpu(config), verbose=False,
    )  # fmt: skip
    kmeans.train(x)
    distances, labels = kmeans.assign(x)
    centroids = np.array(kmeans.centroids, dtype=np.float32)
    assignments = labels.astype(np.int64)
    distances = distances.astype(np.float32)
    reseeded = _reseed_empty(x, centroids, assignments, distances)
    return KMeansResult(
        centroids=centroids,
        assignments=assignments,
        objective=float(distances.sum(dtype=np.float64)),
        cluster_sizes=np.bincount(assignments, minlength=k).astype(np.int64),
        iterations=len(kmeans.iteration_stats),
        reseeded=reseeded,
        seed=seed,
        seconds=time.perf_counter() - started,
    )


def _reseed_empty(
    x: np.ndarray, centroids: np.ndarray, assignments: np.ndarray, distances: np.ndarray
) -> int:
    """Give every cluster left empty after the final assignment half of the largest cluster.

    Rule (in place, deterministic): for each empty cluster in index order, take the currently
    largest cluster (lowest index on ties), move the floor(size / 2) of its points farthest from
    its centroid (index order on equal distances) to the empty cluster, and set both centroids to
    the mean of their new members. With N >= K the largest cluster always holds >= 2 points, so
    every one of the K pseudo-label classes exists afterwards. Returns the number re-seeded.
    """
    sizes = np.bincount(assignments, minlength=len(centroids))
    empty = np.flatnonzero(sizes == 0)
    for cluster in empty:
        donor = int(np.argmax(sizes))
        members = np.flatnonzero(assignments == donor)
        order = np.argsort(-distances[members], kind="stable")
        moved, kept = members[order[: len(members) // 2]], members[order[len(members) // 2 :]]
        assignments[moved] = cluster
        for target, rows in ((cluster, moved), (donor, kept)):
            centroids[target] = x[rows].mean(axis=0, dtype=np.float64)
            distances[rows] = ((x[rows] - centroids[target]) ** 2).sum(axis=1)
        sizes[cluster], sizes[donor] = len(moved), len(kept)
    return len(empty)


def fit_clusters(
    x: np.ndarray, config: ClusteringConfig, epoch: int
) -> tuple[Preprocessor, KMeansResult]:
    """The whole per-epoch step: fit the preprocessor on `x`, apply it, run K-means."""
    preprocessor = fit_preprocessor(x, config)
    return preprocessor, run_kmeans(preprocessor.apply(x), config, epoch)


def _contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"need two non-empty labelings of equal length, got {len(a)}, {len(b)}")
    ai = np.unique(a, return_inverse=True)[1].ravel()
    bi = np.unique(b, return_inverse=True)[1].ravel()
    na, nb = int(ai.max()) + 1, int(bi.max()) + 1
    return np.bincount(ai * nb + bi, minlength=na * nb).reshape(na, nb).astype(np.float64)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(a: np.ndarray, b: np.ndarray) -> float:
    """Normalised mutual information, MI / mean(H(a), H(b)) (sklearn's default normalisation).

    Two single-cluster labelings give 1.0, as in sklearn.
    """
    table = _contingency(a, b)
    ha, hb = _entropy(table.sum(axis=1)), _entropy(table.sum(axis=0))
    if ha == 0 and hb == 0:
        return 1.0
    p = table / table.sum()
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / outer[nz])).sum())
    return min(max(mi / ((ha + hb) / 2), 0.0), 1.0)


def purity(clusters: np.ndarray, classes: np.ndarray) -> float:
    """Fraction of points whose class is the majority class of their cluster."""
    table = _contingency(clusters, classes)
    return float(table.max(axis=1).sum() / table.sum())
