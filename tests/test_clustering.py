"""clustering/kmeans.py with real faiss (CPU: this machine has no GPU, so the GPU branch is not run)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cluster_train.clustering.kmeans import ClusteringConfig, fit_clusters, fit_preprocessor, nmi, purity, run_kmeans
from data_prep.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def blobs(n_per: int, k: int, d: int = 16, spread: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=10.0, size=(k, d))
    truth = np.repeat(np.arange(k), n_per)
    x = centres[truth] + rng.normal(scale=spread, size=(len(truth), d))
    return x.astype(np.float32), truth


def test_nmi_hand_computed() -> None:
    # a = [0,0,1,1], b = [0,0,0,1]: MI = 1.5 ln2 - 0.75 ln3, H(a) = ln2,
    # H(b) = 0.75 ln(4/3) + 0.25 ln4
    mi = 1.5 * math.log(2) - 0.75 * math.log(3)
    h_a, h_b = math.log(2), 0.75 * math.log(4 / 3) + 0.25 * math.log(4)
    assert nmi([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(mi / ((h_a + h_b) / 2))
    assert nmi([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.343711, abs=1e-6)


def test_nmi_properties() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 5, 200), rng.integers(0, 3, 200)
    assert nmi(a, b) == pytest.approx(nmi(b, a))
    assert nmi(a, (a + 2) % 5 * 7) == pytest.approx(1.0)  # invariant to renaming the labels
    assert 0.0 <= nmi(a, b) < 0.1
    assert nmi([1, 1, 1], [4, 4, 4]) == 1.0  # both trivial, as sklearn
    assert nmi([1, 1, 1], [0, 1, 2]) == 0.0
    with pytest.raises(ValueError, match="equal length, got 2, 1"):
        nmi([0, 1], [0])


def test_purity_hand_computed() -> None:
    # cluster 0 holds classes {0, 0, 1}, cluster 1 holds {1, 1, 2}: majorities 2 + 2 of 6
    assert purity([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 2]) == pytest.approx(4 / 6)
    assert purity([0, 1, 2], [5, 5, 5]) == 1.0


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="use_gpu"):
        ClusteringConfig(use_gpu="yes")
    with pytest.raises(ConfigError, match="num_clusters"):
        ClusteringConfig(num_clusters=0)


def test_blobs_recovered() -> None:
    x, truth = blobs(200, 5, seed=3)
    config = ClusteringConfig(num_clusters=5, pca_dim=8)
    preprocessor, result = fit_clusters(x, config, seed=0)
    assert nmi(result.assignments, truth) > 0.95
    assert result.assignments.dtype == np.int64 and result.assignments.shape == (len(x),)
    assert result.centroids.shape == (5, 8) and result.centroids.dtype == np.float32
    assert result.cluster_sizes.sum() == len(x) and result.reseeded == 0
    assert 1 <= result.iterations <= config.iterations  # faiss may stop early once converged
    assert preprocessor.apply(x).shape == (len(x), 8)


def test_all_points_used_no_subsampling() -> None:
    k = 4
    x, _ = blobs(400, k, d=8, spread=1.0, seed=5)
    assert len(x) > 256 * k  # faiss's default would train on 1,024 of these 1,600 points
    full = run_kmeans(x, ClusteringConfig(num_clusters=k, iterations=10), seed=0)
    means = np.stack([x[full.assignments == c].mean(axis=0) for c in range(k)])
    np.testing.assert_allclose(full.centroids, means, atol=1e-4)  # every point moved the centroids
    objective = ((x - full.centroids[full.assignments]) ** 2).sum()
    assert full.objective == pytest.approx(objective, rel=1e-4)
    # faiss's default subsampling (256 per centroid) trains on a sample: the means drift.
    sampled = run_kmeans(x, ClusteringConfig(num_clusters=k, max_points_per_centroid=256), seed=0)
    sampled_means = np.stack([x[sampled.assignments == c].mean(axis=0) for c in range(k)])
    assert np.abs(sampled.centroids - sampled_means).max() > 1e-3


def test_dead_and_constant_columns_give_no_nan() -> None:
    rng = np.random.default_rng(0)
    x = np.maximum(rng.normal(size=(300, 32)), 0).astype(np.float32)  # ReLU-like
    x[:, :5] = 0.0  # dead units
    x[:, 5] = 3.5  # constant
    for config in (ClusteringConfig(pca_dim=16), ClusteringConfig(pca_dim=None)):
        y = fit_preprocessor(x, config).apply(x)
        assert y.dtype == np.float32 and np.isfinite(y).all()
        np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
    constant = np.full((50, 8), 2.0, dtype=np.float32)
    assert np.isfinite(fit_preprocessor(constant, ClusteringConfig()).apply(constant)).all()


def test_whitening_gives_unit_covariance() -> None:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(5000, 6)) @ rng.normal(size=(6, 6)) + 4).astype(np.float32)
    config = ClusteringConfig(pca_dim=4, whiten=True, l2_normalize=False)
    y = fit_preprocessor(x, config).apply(x)
    np.testing.assert_allclose(np.cov(y, rowvar=False), np.eye(4), atol=1e-3)
    assert abs(y.mean(axis=0)).max() < 1e-3


def test_same_seed_reproduces_another_seed_changes_the_clustering() -> None:
    x = np.random.default_rng(0).uniform(size=(2000, 2)).astype(np.float32)  # no true clusters
    config = ClusteringConfig(num_clusters=8)
    first, again = run_kmeans(x, config, seed=10), run_kmeans(x, config, seed=10)
    np.testing.assert_array_equal(first.assignments, again.assignments)
    np.testing.assert_array_equal(first.centroids, again.centroids)
    other = run_kmeans(x, config, seed=11)
    assert (first.seed, other.seed) == (10, 11)
    assert not np.array_equal(first.assignments, other.assignments)


def test_empty_clusters_are_reseeded() -> None:
    # 3 distinct points (30 copies each), K = 5: faiss cannot fill 2 clusters, the repair does.
    x = np.repeat(np.eye(3, 8, dtype=np.float32), 30, axis=0)
    result = run_kmeans(x, ClusteringConfig(num_clusters=5), seed=0)
    assert result.reseeded >= 2  # K - 3 at least; more when two initial centroids coincide
    assert (result.cluster_sizes > 0).all() and result.cluster_sizes.sum() == len(x)
    assert set(result.assignments.tolist()) == set(range(5))
    assert result.objective == pytest.approx(0.0, abs=1e-6)  # moved copies sit on their centroid
    for cluster in range(5):  # a cluster never mixes two distinct points
        assert len(np.unique(x[result.assignments == cluster], axis=0)) == 1


def test_kmeans_leaves_the_callers_thread_count() -> None:
    # faiss and torch share one OpenMP runtime once torch has loaded and used it (as in a training
    # process): K-means on 2 threads left a 1-thread training loop on 2 threads. A fresh process,
    # because whether they share it depends on what the process loaded and ran before.
    script = """
import numpy as np, torch
torch.set_num_threads(1)
torch.nn.Conv2d(8, 8, 3)(torch.randn(4, 8, 32, 32)).sum().backward()  # starts the OpenMP runtime
print(torch.get_num_threads())
from cluster_train.clustering.kmeans import ClusteringConfig, run_kmeans
run_kmeans(np.random.default_rng(0).random((500, 8), np.float32), ClusteringConfig(num_clusters=4, threads=2), seed=0)
print(torch.get_num_threads())
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "1"]


def test_too_few_points_is_an_error() -> None:
    with pytest.raises(ValueError, match="N >= K"):
        run_kmeans(np.zeros((3, 4), np.float32), ClusteringConfig(num_clusters=5), seed=0)


# --- GPU path: runs only where faiss / torch see a GPU (bench/gpu_check.sh on a GPU machine) -------

faiss_gpus = __import__("faiss").get_num_gpus() if hasattr(__import__("faiss"), "get_num_gpus") else 0


@pytest.mark.skipif(faiss_gpus == 0, reason="faiss sees no GPU (faiss-cpu or no device): the GPU path needs one")
def test_gpu_kmeans_agrees_with_cpu() -> None:
    x, truth = blobs(2000, 8, d=32, seed=11)
    cpu = run_kmeans(x, ClusteringConfig(num_clusters=8, use_gpu=False), seed=0)
    gpu = run_kmeans(x, ClusteringConfig(num_clusters=8, use_gpu=True), seed=0)
    assert nmi(gpu.assignments, cpu.assignments) > 0.99 and nmi(gpu.assignments, truth) > 0.99
    assert gpu.objective == pytest.approx(cpu.objective, rel=1e-3)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="torch sees no CUDA device")
def test_gpu_blockwise_assignment_matches_cpu() -> None:
    from cluster_train.clustering.kmeans import assign

    x, _ = blobs(3000, 5, d=32, seed=12)
    preprocessor = fit_preprocessor(x, ClusteringConfig(pca_dim=16))
    centroids = preprocessor.apply(x[:5])
    cpu_labels, cpu_distances = assign(x, centroids, preprocessor, device="cpu")
    gpu_labels, gpu_distances = assign(x, centroids, preprocessor, device="cuda")
    assert (cpu_labels == gpu_labels).mean() > 0.999
    np.testing.assert_allclose(cpu_distances, gpu_distances, atol=1e-3)


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="torch sees no CUDA device")
def test_gpu_lloyd_on_resident_rows_matches_host_rows() -> None:
    import torch

    from cluster_train.clustering.kmeans import assign, lloyd_step, resident

    x, _ = blobs(40_000, 6, d=32, seed=13)
    y = fit_preprocessor(x, ClusteringConfig()).apply(x)
    on_device = resident(y, "cuda")
    assert isinstance(on_device, torch.Tensor) and on_device.is_cuda
    assert resident(y, "cpu") is y  # the CPU path keeps the host array
    centroids = y[:6].copy()
    host_sums, host_counts = lloyd_step(y, centroids, "cuda")
    sums, counts = lloyd_step(on_device, centroids, "cuda")
    np.testing.assert_array_equal(counts, host_counts)
    np.testing.assert_allclose(sums, host_sums, rtol=1e-4)  # float32 atomics: the order of adds varies
    assert (assign(on_device, centroids, None, "cuda")[0] == assign(y, centroids, None, "cpu")[0]).mean() > 0.999
