"""What DeepCluster's additions do on RAVDESS: PCA-whitening + L2 before K-means, and stage-1
batches drawn uniformly over clusters, each against the paper's plain setting.

    python bench/clustering_ablation.py [--data outputs/ravdess_sample/prepared] [--epochs 1]
        [--variants pca_l2 both] [--encoder outputs/runs/<run>/best_model]

Part 1, preprocessing (seconds): the train chunks embedded once by an encoder (a trained bundle if
given, and a randomly initialised one), then K-means (K = 10) with seeds 0-9 on raw features (the
paper), L2 only, and PCA-256 whitening + L2: cluster-to-emotion-category NMI and purity, agreement
between seeds (mean pairwise NMI), smallest cluster.
Part 2, training: DeepEmoCluster runs (1 worker, K = 10, the same seed, optimizer and data), by
default the stage-1 sampler alone on the default preprocessing (L2 only):
  l2_all      every stage-1 chunk once (the paper)
  l2_uniform  stage-1 chunks redrawn uniformly over clusters (DeepCluster's sampler)
(also available: paper, pca_l2, uniform, both: raw / PCA-256-whitened+L2 features x either sampler).
With the same seed both runs cluster the same embeddings at epoch 0: only the sampler differs.
Per epoch (from the run's MLflow store): cluster-to-emotion-category NMI and purity, NMI with the
previous epoch's labels, smallest cluster, stage-1 cross-entropy, development CCC. The encoder uses
Adam 5e-4 in every run (REFERENCE.md: with the paper's SGD 1e-3 the cluster head learns nothing in a
few epochs on a corpus this small, whatever the clustering). Writes
bench/results/clustering_ablation.json with each variant's ratio to "paper".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "paper": ["clustering.pca_dim=null", "clustering.whiten=false", "clustering.l2_normalize=false",
              "clustering.stage1_sampler=all"],
    "pca_l2": ["clustering.pca_dim=256", "clustering.whiten=true", "clustering.stage1_sampler=all"],
    "uniform": ["clustering.pca_dim=null", "clustering.whiten=false", "clustering.l2_normalize=false",
                "clustering.stage1_sampler=uniform"],
    "both": ["clustering.pca_dim=256", "clustering.whiten=true", "clustering.stage1_sampler=uniform"],
    # the sampler alone, on the default preprocessing (L2 only): every chunk once vs uniform
    "l2_all": ["clustering.pca_dim=null", "clustering.whiten=false", "clustering.l2_normalize=true",
               "clustering.stage1_sampler=all"],
    "l2_uniform": ["clustering.pca_dim=null", "clustering.whiten=false", "clustering.l2_normalize=true",
                   "clustering.stage1_sampler=uniform"],
}
PER_EPOCH = ["cluster/nmi_category", "cluster/purity_category", "cluster/nmi_previous", "cluster/size_min",
             "train/stage1_loss", "dev/ccc_arousal", "dev/ccc_dominance", "dev/ccc_valence", "cluster/reseeded"]


PREPROCESSING = {
    "paper_raw": dict(pca_dim=None, whiten=False, l2_normalize=False),
    "l2_only": dict(pca_dim=None, whiten=False, l2_normalize=True),
    "pca_whiten_l2": dict(pca_dim=256, whiten=True, l2_normalize=True),
    "pca32_whiten_l2": dict(pca_dim=32, whiten=True, l2_normalize=True),  # a reduction, as DeepCluster's
}


def preprocessing_part(data: str, encoder: str | None, seeds: int = 10) -> dict:
    """Part 1: K-means on fixed embeddings of the train chunks, per preprocessing."""
    import torch

    from cluster_train.clustering.kmeans import ClusteringConfig, fit_clusters, nmi, purity
    from cluster_train.model.blocks import ModelConfig
    from cluster_train.model.kinds import build_model
    from cluster_train.serve.bundle import load_bundle
    from data_prep.config import ChunkConfig
    from data_prep.dataset import PreparedDataset

    torch.set_num_threads(1)
    dataset = PreparedDataset(data)
    table = dataset.read_table(["train"], ["id", "category", "frames"])
    chunks = dataset.frame_format.chunks_of(table["frames"], ChunkConfig())  # (U, C, frames, mels), the paper's chunking
    categories = np.repeat(np.asarray(table["category"].to_pylist(), dtype=str), chunks.shape[1])
    x = dataset.normalizer().torch(torch.from_numpy(chunks.astype(np.float32))).reshape(-1, *chunks.shape[2:])
    encoders = {"random_init": build_model("deepemocluster", ModelConfig())}
    if encoder:
        encoders["trained_bundle"] = load_bundle(encoder).model
    out: dict = {"encoder_bundle": encoder, "chunks": int(len(x)), "k": 10, "seeds": seeds}
    for name, model in encoders.items():
        model.eval()
        with torch.no_grad():
            features = torch.cat([model.embed(x[i : i + 128]) for i in range(0, len(x), 128)]).numpy()
        out[name] = {}
        for variant, settings in PREPROCESSING.items():
            runs = [fit_clusters(features, ClusteringConfig(num_clusters=10, threads=1, **settings), seed=e)[1]
                    for e in range(seeds)]
            labels = [r.assignments for r in runs]
            pairwise = [nmi(labels[i], labels[j]) for i in range(seeds) for j in range(i + 1, seeds)]
            out[name][variant] = {
                "nmi_category": round(float(np.mean([nmi(l, categories) for l in labels])), 4),
                "nmi_category_sd": round(float(np.std([nmi(l, categories) for l in labels])), 4),
                "purity_category": round(float(np.mean([purity(l, categories) for l in labels])), 4),
                "nmi_between_seeds": round(float(np.mean(pairwise)), 4),
                "smallest_cluster": int(min(r.cluster_sizes.min() for r in runs)),
            }
            print(name, variant, out[name][variant], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO / "outputs" / "ravdess_sample" / "prepared"))
    parser.add_argument("--encoder", default=None, help="a trained model bundle to embed with (part 1)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variants", nargs="+", default=["l2_all", "l2_uniform"])
    parser.add_argument("--output", default=str(REPO / "bench" / "results" / "clustering_ablation.json"))
    parser.add_argument("--resume", action="store_true", help="keep part 1 and the finished runs of --output")
    args = parser.parse_args()

    started = time.perf_counter()
    runs: dict = {}
    if args.resume and Path(args.output).is_file():
        previous = json.loads(Path(args.output).read_text())["details"]
        preprocessing, runs = previous["preprocessing"], previous["runs"]
    else:
        preprocessing = preprocessing_part(args.data, args.encoder)
    Path(args.output).write_text(json.dumps(_result(runs, args, started, preprocessing), indent=2) + "\n")

    import ray
    from mlflow import MlflowClient

    from cluster_train.train.config import load_train_config
    from cluster_train.train.launch import run_training

    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    work = Path(tempfile.mkdtemp(prefix="clustering_ablation_"))
    store = f"sqlite:///{work / 'mlflow.db'}"
    for seed in args.seeds:
        for variant in args.variants:
            if any(r["seed"] == seed for r in runs.get(variant, [])):
                continue
            overrides = [f"data.dataset={args.data}", f"epochs={args.epochs}", f"patience={args.epochs}",
                         f"seed={seed}", f"storage_path={work / 'runs'}", f"tracking.tracking_uri={store}",
                         f"name={variant}-{seed}", "optim.encoder.name=adam", "optim.encoder.lr=5e-4",
                         "optim.encoder.weight_decay=0", *VARIANTS[variant]]
            config = load_train_config(REPO / "configs/train/ravdess_sample.yaml", overrides)
            run_started = time.perf_counter()
            result = run_training(config)
            client = MlflowClient(store)
            history = {m: [h.value for h in sorted(client.get_metric_history(result.mlflow_run_id, m),
                                                   key=lambda h: h.step)] for m in PER_EPOCH}
            runs.setdefault(variant, []).append({"seed": seed, "seconds": round(time.perf_counter() - run_started, 1),
                                                 "per_epoch": history, "overrides": VARIANTS[variant]})
            print(variant, seed, {k: v[-1] if v else None for k, v in history.items()}, flush=True)
            Path(args.output).write_text(json.dumps(_result(runs, args, started, preprocessing), indent=2) + "\n")
    ray.shutdown()
    Path(args.output).write_text(json.dumps(_result(runs, args, started, preprocessing), indent=2) + "\n")


def _last(runs: list[dict], metric: str) -> float | None:
    values = [r["per_epoch"][metric][-1] for r in runs if r["per_epoch"].get(metric)]
    return float(np.mean(values)) if values else None


def _result(runs: dict, args, started: float, preprocessing: dict) -> dict:
    summary = {variant: {m: _last(rs, m) for m in PER_EPOCH} for variant, rs in runs.items()}
    plain = summary.get("l2_all", {})  # the sampler's paper setting: every chunk once
    ratios = {variant: {m: (round(v / plain[m], 4) if v is not None and plain.get(m) else None)
                        for m, v in values.items()} for variant, values in summary.items()}
    encoder = "trained_bundle" if "trained_bundle" in preprocessing else "random_init"
    ours = preprocessing.get(encoder, {}).get("l2_only", {}).get("nmi_category")
    paper = preprocessing.get(encoder, {}).get("paper_raw", {}).get("nmi_category")
    return {
        "name": f"cluster-to-emotion-category NMI, L2 normalisation before K-means (the default; {encoder} "
                "encoder, 10 seeds)",
        "value": ours, "unit": "NMI",
        "baseline": "the paper's plain setting: raw features into K-means, same embeddings and seeds",
        "baseline_value": paper,
        "ratio": round(ours / paper, 4) if ours and paper else None,
        "command": "python bench/clustering_ablation.py " + " ".join(
            ["--data", args.data, "--epochs", str(args.epochs), "--variants", *args.variants]
            + (["--encoder", args.encoder] if args.encoder else [])),
        "details": {"preprocessing": preprocessing,
                    "sampler_training_last_epoch": summary, "sampler_ratio_to_every_chunk_once": ratios, "runs": runs,
                    "seconds_total": round(time.perf_counter() - started, 1),
                    "setting": "RAVDESS sample (120 train / 120 development utterances x 11 chunks), K = 10, 1 worker, "
                               "batch 16, Adam 5e-4 encoder; 2-core machine shared with other jobs (load average "
                               f"{os.getloadavg()[0]:.0f} at the end)"},
    }


if __name__ == "__main__":
    main()
