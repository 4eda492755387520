"""The project's CUDA paths on one GPU, without Ray: what a lent GPU machine can check.

    python bench/gpu_check.py [--sizes 1000010 5500000] [--bundle DIR] [--output FILE]

1. All-reduce K-means (`clustering.mode: allreduce`, the GPU path of issue 5): `AllReduceLabeler`
   with its Lloyd steps and assignment on the GPU, one rank, on the K-means bench's synthetic 256-d
   vectors, against `faiss.Kmeans` (CPU, all cores) trained and assigned on the same rows, and
   against the same labeler on the CPU (at the smallest size). Time and agreement (NMI).
2. DDP over NCCL: DeepEmoCluster wrapped in DistributedDataParallel on the GPU (world size 1: NCCL
   refuses two ranks on one device), stage-1 and stage-2 steps with the trainer's losses and
   optimizer groups; the untrained model's eval-mode outputs match the CPU's; chunks per second.
3. Prediction on the GPU: a trained bundle (`--bundle`) predicts real files with `predict_file` on
   the GPU and the CPU; the largest difference.
Writes bench/results/gpu_check.json: value = all-reduce seconds on the GPU at the largest size,
baseline = faiss CPU K-means (train + assign, every core) on the same rows, ratio = ours / baseline.

Ray is not imported by any of these paths, but `cluster_train.clustering.labelers` imports it for its
actor modes. On a machine without Ray (the lent GPU machines: its 79 MB wheel cannot be carried
there) an empty stand-in module is registered; nothing here calls it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

try:
    import ray  # noqa: F401
except ImportError:
    sys.modules["ray"] = types.SimpleNamespace(  # type: ignore[assignment]
        exceptions=types.SimpleNamespace(), remote=lambda *args, **kwargs: (lambda cls: cls), method=lambda **kwargs: (lambda f: f))

from kmeans_bench import KEY_BASE, NUM_CHUNKS, PREPROCESSING, K, generate  # noqa: E402

from cluster_train.clustering.kmeans import (  # noqa: E402
    ClusteringConfig,
    fit_preprocessor,
    nmi,
    preprocess_inplace,
    run_kmeans,
)
from cluster_train.clustering.labelers import AllReduceLabeler  # noqa: E402
from cluster_train.distributed import Collective

COMMAND = "python bench/gpu_check.py"


def allreduce_labels(x: np.ndarray, device: str) -> tuple[np.ndarray, float, dict]:
    config = ClusteringConfig(num_clusters=K, mode="allreduce", use_gpu=device != "cpu", **PREPROCESSING)
    keys = KEY_BASE * NUM_CHUNKS + np.arange(len(x), dtype=np.int64)
    if device != "cpu":
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = AllReduceLabeler(config, Collective(), torch.device(device)).label(0, keys, x, NUM_CHUNKS)
    seconds = time.perf_counter() - started
    return result.table.lookup(keys).astype(np.uint8), seconds, result.summary


def faiss_reference(x: np.ndarray) -> tuple[np.ndarray, float]:
    config = ClusteringConfig(num_clusters=K, use_gpu=False, **PREPROCESSING)
    started = time.perf_counter()
    y = preprocess_inplace(x, fit_preprocessor(x, config))
    result = run_kmeans(y, config, seed=0)
    return result.assignments.astype(np.uint8), time.perf_counter() - started


def check_kmeans(sizes: list[int]) -> dict:
    out = {}
    for size in sizes:
        x, truth = generate(0, size)
        reference, reference_seconds = faiss_reference(x.copy())
        row = {"faiss_cpu_seconds": round(reference_seconds, 2),
               "nmi_faiss_vs_truth": round(nmi(reference, truth), 4)}
        if size == min(sizes):
            cpu_labels, cpu_seconds, _ = allreduce_labels(x.copy(), "cpu")
            row |= {"allreduce_cpu_seconds": round(cpu_seconds, 2)}
        gpu_labels, gpu_seconds, summary = allreduce_labels(x, "cuda")  # preprocesses x in place
        row |= {"allreduce_gpu_seconds": round(gpu_seconds, 2), "iterations": summary["iterations"],
                "nmi_gpu_vs_faiss": round(nmi(gpu_labels, reference), 4),
                "nmi_gpu_vs_truth": round(nmi(gpu_labels, truth), 4)}
        if size == min(sizes):
            row["nmi_gpu_vs_cpu_allreduce"] = round(nmi(gpu_labels, cpu_labels), 4)
        print(f"K-means {size:,} rows: {row}", flush=True)
        out[str(size)] = row
        del x
    return out


def ddp_steps(device: str, steps: int, batch: int = 256) -> dict:
    """Stage 1 (pseudo-label CE) and stage 2 (1 - CCC + CE) steps of DeepEmoCluster under DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cluster_train.model.blocks import ModelConfig
    from cluster_train.model.kinds import build_model
    from cluster_train.model.losses import ccc_loss, cluster_ce, sentence_mean

    torch.manual_seed(0)
    config = ModelConfig()
    model = build_model("deepemocluster", config).to(device, memory_format=torch.channels_last)  # as the trainer
    groups = model.param_groups()
    wrapped = DistributedDataParallel(model, device_ids=[0] if device == "cuda" else None, find_unused_parameters=True)
    sgd = torch.optim.SGD(groups["encoder"] + groups["cluster_top"], lr=1e-3, momentum=0.9)
    adam = torch.optim.Adam(groups["regressor"], lr=5e-4)
    generator = torch.Generator().manual_seed(1)
    chunks = torch.randn(batch, config.chunk_frames, config.n_mels, generator=generator).to(device)
    labels = torch.randint(0, config.num_clusters, (batch,), generator=generator).to(device)
    targets = torch.rand(batch // NUM_CHUNKS, 3, generator=generator).to(device)
    labeled = chunks[: (batch // NUM_CHUNKS) * NUM_CHUNKS]
    model.eval()
    with torch.no_grad():  # dropout draws differ between devices: compare the eval-mode outputs
        initial = wrapped(chunks)["prediction"].cpu().numpy()
    model.train()
    losses = []
    for step in range(steps):
        if step == 1:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        sgd.zero_grad()
        stage1 = cluster_ce(wrapped(chunks)["cluster_logits"], labels)
        stage1.backward()
        sgd.step()
        sgd.zero_grad(), adam.zero_grad()
        out = wrapped(labeled)
        stage2 = ccc_loss(sentence_mean(out["prediction"], NUM_CHUNKS), targets) + cluster_ce(
            out["cluster_logits"], labels[: len(labeled)])
        stage2.backward()
        sgd.step(), adam.step()
        losses.append((float(stage1), float(stage2)))
    if device == "cuda":
        torch.cuda.synchronize()
    timed = time.perf_counter() - started
    return {"initial_prediction": initial, "first_step_losses": losses[0], "last_step_losses": losses[-1],
            "chunks_per_second": round((steps - 1) * (batch + len(labeled)) / timed, 1),
            "backend": dist.get_backend()}


def check_ddp(steps: int) -> dict:
    import torch.distributed as dist

    out = {}
    for device, backend in (("cuda", "nccl"), ("cpu", "gloo")):
        dist.init_process_group(backend, init_method="tcp://127.0.0.1:29517", rank=0, world_size=1)
        try:
            out[device] = ddp_steps(device, steps if device == "cuda" else 3)
        finally:
            dist.destroy_process_group()
    gpu, cpu = out["cuda"].pop("initial_prediction"), out["cpu"].pop("initial_prediction")
    out["eval_prediction_max_abs_diff"] = float(np.abs(gpu - cpu).max())
    out["eval_prediction_scale"] = float(np.abs(cpu).max())
    out["gpu_vs_cpu_chunks_per_second"] = round(out["cuda"]["chunks_per_second"] / out["cpu"]["chunks_per_second"], 2)
    print(f"DDP: {out}", flush=True)
    return out


def check_predict(bundle_dir: str, files: list[str]) -> dict:
    from cluster_train.serve.bundle import load_bundle
    from cluster_train.serve.predict import predict_file

    results = {}
    for device in ("cpu", "cuda"):
        bundle = load_bundle(bundle_dir, map_location=device)
        bundle.model.to(device)
        started = time.perf_counter()
        results[device] = np.array([[v for v in predict_file(bundle, f).values()] for f in files])
        results[device + "_seconds"] = time.perf_counter() - started
    out = {"files": len(files), "max_abs_diff": float(np.abs(results["cuda"] - results["cpu"]).max()),
           "cpu_seconds": round(results["cpu_seconds"], 2), "gpu_seconds": round(results["cuda_seconds"], 2)}
    print(f"predict: {out}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_010, 5_500_000])
    parser.add_argument("--ddp-steps", type=int, default=20)
    parser.add_argument("--bundle", default=str(REPO / "outputs/bench/accuracy/accuracy-ravdess-model_kind_deepemocluster-seed0/best_model"))
    parser.add_argument("--audio", default=str(REPO / "data/ravdess_sample"))
    parser.add_argument("--output", default=str(REPO / "bench/results/gpu_check.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA device")
    from cluster_train.clustering.kmeans import faiss  # its one import, which names the extras

    details = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "faiss": faiss.__version__,
               "faiss_gpus": faiss.get_num_gpus(), "cpu_cores": os.cpu_count(), "preprocessing": PREPROCESSING}
    print(details, flush=True)
    details["kmeans"] = check_kmeans(sorted(args.sizes))
    details["ddp"] = check_ddp(args.ddp_steps)
    files = sorted(glob.glob(os.path.join(args.audio, "**", "*.flac"), recursive=True))[:24]
    if os.path.isdir(args.bundle) and files:
        details["predict"] = check_predict(args.bundle, files)
    largest = details["kmeans"][str(max(args.sizes))]
    result = {"name": "gpu_check", "value": largest["allreduce_gpu_seconds"], "unit": "s",
              "baseline": f"faiss.Kmeans on the CPU ({os.cpu_count()} cores), train + assign, same {max(args.sizes):,} rows",
              "baseline_value": largest["faiss_cpu_seconds"],
              "ratio": round(largest["allreduce_gpu_seconds"] / largest["faiss_cpu_seconds"], 3),
              "command": COMMAND, "details": details}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
