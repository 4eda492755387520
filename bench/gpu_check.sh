#!/usr/bin/env bash
# The clustering's GPU path, on a machine with an NVIDIA GPU (none here): swaps faiss-cpu for the
# `gpu` extra's faiss-gpu in .venv, runs the GPU tests (skipped elsewhere), then times faiss K-means
# on 1M x 256 vectors on the CPU and the GPU in one process and checks they agree.
#   bash bench/gpu_check.sh            (about 2-3 minutes; prints one JSON line at the end)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! "$PY" -c "import faiss, sys; sys.exit(0 if faiss.get_num_gpus() > 0 else 1)" 2>/dev/null; then
  "$PY" -m pip uninstall -y faiss-cpu
  "$PY" -m pip install -e ".[gpu]"  # the gpu extra: faiss-gpu at its pinned version
fi
"$PY" -c "import faiss, torch; print('faiss GPUs:', faiss.get_num_gpus(), '| torch CUDA:', torch.cuda.is_available())"
"$PY" -m pytest tests/test_clustering.py -q -k gpu -rs
"$PY" - <<'PY'
import json, time
import numpy as np
from cluster_train.clustering import ClusteringConfig, fit_clusters, nmi
rng = np.random.default_rng(0)
x = (rng.normal(scale=0.5, size=(10, 256))[rng.integers(0, 10, 1_000_000)] + rng.normal(size=(1_000_000, 256))).astype(np.float32)
out = {}
for name, gpu in (("cpu", False), ("gpu", True)):
    started = time.perf_counter()
    _, result = fit_clusters(x, ClusteringConfig(num_clusters=10, use_gpu=gpu), epoch=0)
    out[name] = {"seconds": round(time.perf_counter() - started, 2), "labels": result.assignments}
print(json.dumps({"rows": len(x), "cpu_seconds": out["cpu"]["seconds"], "gpu_seconds": out["gpu"]["seconds"],
                  "nmi_gpu_vs_cpu": round(nmi(out["gpu"]["labels"], out["cpu"]["labels"]), 4)}))
PY
