"""K-means pseudo-labels: preprocessing, faiss K-means, empty-cluster repair and diagnostics.

Pure functions, no Ray: the K-means service (`clustering/service.py`) and the distributed modes
(`clustering/labelers.py`) call them. Everything is float32 on the way in and out; statistics are
float64 inside. `assign` and `lloyd_step` work block by block (torch, on a GPU when given one), so
the preprocessed copy of N vectors never exists unless a caller asks for it.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from data_prep.config import require, require_choice

try:  # the project's one import of faiss: faiss-cpu and faiss-gpu both provide it
    import faiss
except ImportError as error:
    raise ImportError("faiss is not installed: install the project with one of its extras, .[cpu] "
                      "(faiss-cpu) or .[gpu] (faiss-gpu), never both: pip install -e '.[cpu]'") from error

log = logging.getLogger(__name__)
# Arrays that come out of Ray's object store are read-only; the blocks are only ever read.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

# Where the K-means of an epoch runs (see labelers.py):
#   gather     every rank sends all its vectors to one actor (the reference; right for small data)
#   sample     every rank sends a bounded sample; the actor fits centroids; each rank assigns its own
#   allreduce  Lloyd iterations among the training ranks, only d x d moments and K x d sums all-reduced
MODES = ("gather", "sample", "allreduce")
# Stage-1 batches: "all" = every chunk once (the paper); "uniform" = chunks redrawn uniformly over
# clusters (DeepCluster's sampler).
SAMPLERS = ("all", "uniform")
# Where training's pseudo-labels come from: "kmeans" (the method); "shuffled" (a control) K-means's
# labels permuted over all chunks every epoch: the same cluster sizes, no relation to the audio.
PSEUDO_LABELS = ("kmeans", "shuffled")


@dataclass(kw_only=True)
class ClusteringConfig:
    num_clusters: int = 10  # K: the pseudo-label classes (the paper's Table 4 tries 10, 20, 30)
    iterations: int = 20  # K-means (Lloyd) iterations an epoch
    # Default: L2 normalisation only. Measured on RAVDESS (bench/results/clustering_ablation.json):
    # PCA-256 whitening of these 256-d features (DeepCluster's 4096 -> 256 is a reduction; here it
    # only rescales) lowered cluster-to-emotion NMI 0.052 -> 0.016 and seed-to-seed agreement
    # 0.67 -> 0.38; L2 alone kept the NMI and raised the agreement and the smallest cluster.
    # PCA to this many dimensions before K-means; None keeps every dimension (no projection).
    pca_dim: int | None = None
    # Scale each principal direction to unit variance (DeepCluster's PCA whitening).
    whiten: bool = False
    l2_normalize: bool = True  # scale every embedding to unit length before K-means
    # Floor on the eigenvalues used for whitening, relative to the largest one: a dead ReLU
    # dimension has eigenvalue 0 and would otherwise be divided by 0 (NaN / inf).
    eigen_floor: float = 1e-5
    # faiss trains on at most 256 points per centroid by default and silently drops the rest
    # (K = 10: 2,560 points). None trains on every point; an int restores faiss's subsampling.
    max_points_per_centroid: int | None = None
    # Where the K-means actor ("gather", "sample") runs, decided from the config, never from the GPUs
    # the cluster has when the run starts (an autoscaling cluster's GPU nodes may be scaled to 0):
    #   auto   a CPU actor, CPU faiss: the actor never takes a GPU the training workers need (it is
    #          placed before them: on 8 one-GPU nodes, 8 GPU workers would wait forever)
    #   true   the actor asks Ray for one GPU of its own, beyond the training's (an autoscaler launches
    #          a GPU node for it, a whole node where a GPU node has one GPU) and faiss runs there
    #   false  a CPU actor, CPU faiss
    # `service.actor_options` decides; the actor gets the decision as true/false. Called directly
    # (one process without Ray, "allreduce" in the workers), `run_kmeans` reads "auto" as "on a GPU
    # when faiss sees one": the process's own.
    use_gpu: bool | str = "auto"
    threads: int | None = None  # faiss OpenMP threads; None: the CPUs this process may use
    mode: str = "gather"  # one of MODES
    # sample / allreduce: the points (all ranks together) PCA-whitening is fitted on, and in
    # "sample" mode also the points the centroids are trained on. Bounds what reaches the actor.
    sample_size: int = 65_536
    # "gather": the most memory the actor may need (GB, all copies: `train/preflight.py`); a run
    # needing more fails before it starts. 500K segments x 11 chunks need ~17 GB: use "sample" there.
    gather_max_gb: float = 4.0
    # How long the driver waits for the K-means actor to be placed before failing with what it asked
    # for and what the cluster has; an autoscaler launching a GPU node for it takes minutes.
    placement_timeout_s: float = 900.0
    # The actor is restarted this many times when it dies (-1: always); an epoch's clustering is
    # retried on every rank that many times.
    actor_restarts: int = 3
    # "gather" / "sample": how long the ranks that sent their chunks to the actor wait for the others,
    # counted from the latest arrival (each arrival restarts it). It bounds the wait on a rank that is
    # stuck or gone, not the clustering, which starts once all are in. Ranks embed equal shards and
    # arrive close together, but a rank's pass over its shard can take tens of minutes at 500K
    # segments: 30 min leaves room for one to lag far behind before the round fails.
    round_timeout_s: float = 1800.0
    # "all" (the paper's): on RAVDESS the uniform sampler gave no measurable gain after one epoch
    # (stage-1 CE 2.24 vs 2.07, dev CCC ~0.005 vs ~0.01; bench/results/clustering_ablation.json).
    stage1_sampler: str = "all"  # one of SAMPLERS
    pseudo_labels: str = "kmeans"  # one of PSEUDO_LABELS

    def __post_init__(self) -> None:
        require(self.num_clusters >= 1, "num_clusters", "must be >= 1")
        require(self.iterations >= 1, "iterations", "must be >= 1")
        require(self.pca_dim is None or self.pca_dim >= 1, "pca_dim", "must be >= 1 or null")
        require(self.eigen_floor > 0, "eigen_floor", "must be > 0")
        mppc = self.max_points_per_centroid
        require(mppc is None or mppc >= 1, "max_points_per_centroid", "must be >= 1 or null")
        require_choice(self.use_gpu, "clustering.use_gpu", (True, False, "auto"))
        require(self.threads is None or self.threads >= 1, "threads", "must be >= 1 or null")
        require_choice(self.mode, "clustering.mode", MODES)
        require(self.gather_max_gb > 0, "clustering.gather_max_gb", "must be > 0")
        require(self.placement_timeout_s > 0, "clustering.placement_timeout_s", "must be > 0")
        require(self.sample_size >= self.num_clusters, "clustering.sample_size", "must be >= num_clusters")
        require(self.actor_restarts >= -1, "clustering.actor_restarts", "must be >= -1 (-1: always)")
        require(self.round_timeout_s > 0, "clustering.round_timeout_s", "must be > 0")
        require_choice(self.stage1_sampler, "clustering.stage1_sampler", SAMPLERS)
        require_choice(self.pseudo_labels, "clustering.pseudo_labels", PSEUDO_LABELS)


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
    return preprocessor_from_covariance(mean, cov, config)


def moments(x: np.ndarray) -> np.ndarray:
    """[n, sum x (d), sum x x^T (d * d)] as one float64 vector: what ranks all-reduce to fit PCA."""
    x = np.asarray(x, dtype=np.float32)
    second = np.zeros((x.shape[1], x.shape[1]))
    for start in range(0, len(x), 65_536):
        block = x[start : start + 65_536]
        second += block.T @ block
    return np.concatenate([[len(x)], x.sum(axis=0, dtype=np.float64), second.ravel()])


def preprocessor_from_moments(summed: np.ndarray, config: ClusteringConfig) -> Preprocessor:
    """The preprocessor of the union of the points whose `moments` were summed into `summed`."""
    if config.pca_dim is None and not config.whiten:
        return Preprocessor(mean=None, projection=None, l2_normalize=config.l2_normalize)
    d = int(round((-1 + math.sqrt(1 + 4 * (len(summed) - 1))) / 2))
    n, total, second = summed[0], summed[1 : 1 + d], summed[1 + d :].reshape(d, d)
    if n < 1:
        raise ValueError("no points to fit the PCA on")
    mean = total / n
    cov = (second - n * np.outer(mean, mean)) / max(n - 1, 1)
    return preprocessor_from_covariance(mean, cov, config)


def preprocessor_from_covariance(mean: np.ndarray, cov: np.ndarray, config: ClusteringConfig) -> Preprocessor:
    eigenvalues, eigenvectors = np.linalg.eigh(cov)  # ascending
    keep = min(config.pca_dim or len(mean), len(mean))
    eigenvalues, eigenvectors = eigenvalues[::-1][:keep], eigenvectors[:, ::-1][:, :keep]
    projection = eigenvectors
    if config.whiten:
        largest = max(float(eigenvalues[0]), 0.0)
        floor = config.eigen_floor * largest if largest > 0 else 1.0
        projection = eigenvectors / np.sqrt(np.maximum(eigenvalues, floor))
    return Preprocessor(
        mean=np.asarray(mean, dtype=np.float32),
        projection=np.ascontiguousarray(projection, dtype=np.float32),
        l2_normalize=config.l2_normalize,
    )


def _project_block(x: torch.Tensor, preprocessor: Preprocessor) -> torch.Tensor:
    if preprocessor.mean is not None and preprocessor.projection is not None:
        mean = torch.as_tensor(preprocessor.mean, device=x.device)
        x = (x - mean) @ torch.as_tensor(preprocessor.projection, device=x.device)
    if preprocessor.l2_normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return x


def _nearest(y: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of and squared distance to the nearest centroid, per row."""
    partial = torch.addmm((centroids * centroids).sum(dim=1), y, centroids.T, alpha=-2)  # ||c||^2 - 2 y.c
    distance, label = partial.min(dim=1)
    return label, (distance + (y * y).sum(dim=1)).clamp_min(0)


BLOCK_ROWS = 16_384  # rows per block: a few MB, cache-sized, with no N-sized temporaries


def label_dtype(num_clusters: int) -> np.dtype:
    """The smallest unsigned type that holds K labels: 1 byte per chunk up to K = 256."""
    return np.dtype(np.uint8 if num_clusters <= 256 else np.uint16 if num_clusters <= 65_536 else np.int64)


def assign(
    x: np.ndarray | torch.Tensor, centroids: np.ndarray, preprocessor: Preprocessor | None = None,
    device: str | torch.device = "cpu", out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(labels, squared distances) of the rows of `x` to their nearest centroid, block by block.

    With a `preprocessor`, each block is preprocessed on the way (raw features in, no preprocessed
    copy of `x` kept). `out`: an array of `len(x)` rows to write the preprocessed blocks into (it
    may be `x` itself when the preprocessed width is no wider, see `preprocess_inplace`).
    """
    c = torch.as_tensor(np.ascontiguousarray(centroids, dtype=np.float32), device=device)
    labels = np.empty(len(x), dtype=label_dtype(len(centroids)))
    distances = np.empty(len(x), dtype=np.float32)
    for start in range(0, len(x), BLOCK_ROWS):
        y = torch.as_tensor(x[start : start + BLOCK_ROWS], device=device, dtype=torch.float32)
        if preprocessor is not None:
            y = _project_block(y, preprocessor)
        label, distance = _nearest(y, c)
        labels[start : start + len(y)] = label.cpu().numpy()
        distances[start : start + len(y)] = distance.cpu().numpy()
    return labels, distances


def resident(y: np.ndarray, device: str | torch.device, max_fraction: float = 0.5) -> np.ndarray | torch.Tensor:
    """`y` copied onto a CUDA `device` once when it takes at most `max_fraction` of the free device
    memory, else `y` itself. Lloyd iterations read every row each time: from host memory the copies
    cost more than the arithmetic (one H100, 5.5M x 256: 20 s with host blocks, see
    bench/results/gpu_check.json). `assign` and `lloyd_step` take either."""
    device = torch.device(device)
    if device.type != "cuda" or y.nbytes > max_fraction * torch.cuda.mem_get_info(device)[0]:
        return y
    return torch.from_numpy(np.ascontiguousarray(y)).to(device)


def preprocess_inplace(x: np.ndarray, preprocessor: Preprocessor, device: str | torch.device = "cpu") -> np.ndarray:
    """Preprocess the rows of float32 C-contiguous `x` into its own memory, block by block.

    Returns an (N, d') view of `x`'s buffer (d' <= d: block i's output never reaches rows not yet
    read). `x` is consumed. This is how the all-reduce mode keeps one N x d array per rank.
    """
    if x.dtype != np.float32 or not x.flags.c_contiguous:
        raise ValueError("preprocess_inplace needs a C-contiguous float32 array")
    width = x.shape[1] if preprocessor.projection is None else preprocessor.projection.shape[1]
    if width > x.shape[1]:
        raise ValueError(f"cannot widen {x.shape[1]} -> {width} columns in place")
    flat = x.reshape(-1)
    for start in range(0, len(x), BLOCK_ROWS):
        block = torch.as_tensor(x[start : start + BLOCK_ROWS], device=device)
        y = _project_block(block, preprocessor).cpu().numpy()
        flat[start * width : (start + len(y)) * width] = y.reshape(-1)
    return flat[: len(x) * width].reshape(len(x), width)


def lloyd_step(
    y: np.ndarray | torch.Tensor, centroids: np.ndarray, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """One local Lloyd pass over preprocessed `y`: per-cluster sums (K, d) float64 and counts (K,),
    for the ranks to all-reduce. (One read of `y`: no distances, only the nearest centroid.)"""
    c = torch.as_tensor(np.ascontiguousarray(centroids, dtype=np.float32), device=device)
    squared_norms = (c * c).sum(dim=1)
    sums = torch.zeros(c.shape, dtype=torch.float64, device=device)
    counts = torch.zeros(len(c), dtype=torch.float64, device=device)
    for start in range(0, len(y), BLOCK_ROWS):
        block = torch.as_tensor(y[start : start + BLOCK_ROWS], device=device)
        label = torch.addmm(squared_norms, block, c.T, alpha=-2).argmin(dim=1)
        sums += torch.zeros(c.shape, dtype=torch.float32, device=device).index_add_(0, label, block)
        counts += torch.bincount(label, minlength=len(c))
    return sums.cpu().numpy(), counts.cpu().numpy()


def split_empty_centroids(centroids: np.ndarray, counts: np.ndarray) -> int:
    """faiss's rule for clusters left empty by a Lloyd step, made deterministic: each empty cluster
    takes the centroid of the currently largest one, and the two are pushed apart by +-1/1024 in
    alternating coordinates (so the next assignment splits that cluster's points). In place;
    returns how many were split."""
    counts = counts.astype(np.float64).copy()
    empty = np.flatnonzero(counts == 0)
    for cluster in empty:
        donor = int(np.argmax(counts))
        sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
        base = centroids[donor].copy()
        centroids[cluster], centroids[donor] = base * (1 + sign / 1024), base * (1 - sign / 1024)
        counts[cluster] = counts[donor] / 2
        counts[donor] -= counts[cluster]
    return len(empty)


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


@contextmanager
def faiss_omp_threads(threads: int) -> Iterator[None]:
    """faiss's OpenMP threads for a block, the caller's count restored after it. faiss and torch
    share one OpenMP runtime, so a count left set changes torch's too: a training loop set to 1
    thread ran on all CPUs after its first K-means (bench/train_bench.py measured it)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def run_kmeans(x: np.ndarray, config: ClusteringConfig, seed: int) -> KMeansResult:
    """faiss K-means on every row of `x` (float32, (N, d)); `seed` picks the initialisation (a
    training run gives each epoch its own, `seeding.derive(run seed, "kmeans", epoch)`)."""
    started = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = config.num_clusters
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"K-means needs an (N, d) array with N >= K = {k}, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("K-means input holds NaN or inf")
    # faiss subsamples when N > K * max_points_per_centroid; ceil(N / K) makes that never true.
    mppc = config.max_points_per_centroid or max(math.ceil(len(x) / k), 1)
    with faiss_omp_threads(faiss_threads(config)):
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


def fit_clusters(x: np.ndarray, config: ClusteringConfig, seed: int) -> tuple[Preprocessor, KMeansResult]:
    """The whole per-epoch step: fit the preprocessor on `x`, apply it, run K-means with `seed`."""
    preprocessor = fit_preprocessor(x, config)
    return preprocessor, run_kmeans(preprocessor.apply(x), config, seed)


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
