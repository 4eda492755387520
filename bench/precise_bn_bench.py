"""Precise BatchNorm: does a saved model, in eval mode, predict what its weights do?

    python bench/precise_bn_bench.py [--epochs 2] [key=value ...]

Trains the demo's config (configs/train/ravdess_sample.yaml, DeepEmoCluster, one worker) twice in
one Ray session with the same seed: with BatchNorm's running averages (`precise_bn.utterances=0`)
and with the default precise BatchNorm. For each saved model it measures, on the development split:
- CCC as saved (eval mode, `evaluation.evaluate_split`);
- CCC of the same weights with the statistics recomputed by an independent computation, torch's
  `update_bn` over one batch of every train utterance;
- per BatchNorm layer, the mean over channels of running variance / variance of the layer's input
  on development chunks in eval mode (1.0: the statistics fit what the layer sees).
Writes bench/results/precise_bn.json: value = development arousal CCC as saved with precise
BatchNorm, baseline = as saved without it, both from this run; details hold the rest and what
precise BatchNorm cost per epoch.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from accuracy_bench import cpu_model, prepared_dataset  # noqa: E402

from cluster_train.serve.bundle import load_bundle  # noqa: E402
from cluster_train.serve.evaluate import evaluate_split  # noqa: E402
from cluster_train.tracking import git_commit  # noqa: E402
from cluster_train.train.config import load_train_config  # noqa: E402
from cluster_train.train.precise_bn import batchnorm_layers  # noqa: E402
from data_prep.config import ChunkConfig  # noqa: E402

VARIANTS = {"running_averages": 0, "precise_bn": None}  # precise_bn.utterances; None: the default


def split_chunks(dataset, split: str, normalizer, chunks: ChunkConfig) -> torch.Tensor:
    table = dataset.frame_format.chunks_of(dataset.read_table([split], ["frames"])["frames"], chunks)
    return normalizer.torch(torch.tensor(table).float()).flatten(0, 1)


@torch.no_grad()
def variance_ratios(model: torch.nn.Module, chunks: torch.Tensor) -> list[float]:
    """Per BatchNorm layer: mean over channels of running_var / variance of its eval-mode input."""
    inputs: dict = {}
    layers = batchnorm_layers(model)
    hooks = [layer.register_forward_pre_hook(lambda m, x: inputs.setdefault(m, []).append(x[0])) for layer in layers]
    model.eval()
    for start in range(0, len(chunks), 256):
        model(chunks[start : start + 256])
    for hook in hooks:
        hook.remove()
    ratios = []
    for layer in layers:
        x = torch.cat(inputs[layer])
        actual = x.transpose(0, 1).flatten(1).var(dim=1)
        ratios.append(round(float((layer.running_var / actual.clamp_min(1e-12)).mean()), 3))
    return ratios


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--output", default=str(REPO / "bench/results/precise_bn.json"))
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    dataset = prepared_dataset("configs/prep/ravdess_sample.yaml")
    import ray

    from cluster_train.train.launch import run_training

    if not ray.is_initialized():  # preparing the dataset may have started it
        ray.init(address="local", logging_level="WARNING")
    results = {}
    with tempfile.TemporaryDirectory() as storage:
        for variant, utterances in VARIANTS.items():
            extra = [] if utterances is None else [f"precise_bn.utterances={utterances}"]
            config = load_train_config(REPO / "configs/train/ravdess_sample.yaml", [
                f"data.dataset={dataset.location}", f"epochs={args.epochs}", "tracking.enabled=false",
                f"storage_path={storage}", f"name={variant}", *extra, *args.overrides])
            started = time.perf_counter()
            result = run_training(config)
            bundle = load_bundle(result.best_bundle)
            saved = evaluate_split(bundle, dataset, "development")["ccc"]
            dev = split_chunks(dataset, "development", bundle.normalizer, bundle.chunks)
            ratios = variance_ratios(bundle.model, dev)
            recomputed_model = copy.deepcopy(bundle.model)
            torch.optim.swa_utils.update_bn([split_chunks(dataset, "train", bundle.normalizer, bundle.chunks)],
                                            recomputed_model)
            recomputed = evaluate_split(dataclasses.replace(bundle, model=recomputed_model.eval()), dataset,
                                        "development")["ccc"]
            results[variant] = {
                "precise_bn_utterances": config.precise_bn.utterances,
                "dev_ccc_as_saved": {k: round(v, 4) for k, v in saved.items()},
                "dev_ccc_statistics_recomputed": {k: round(v, 4) for k, v in recomputed.items()},
                "test_ccc_as_saved": {k: round(v, 4) for k, v in result.scores["test"].items()},
                "running_var_over_input_var_per_layer": ratios,
                "precise_bn_seconds_last_epoch": round(result.metrics.get("time/precise_bn", 0.0), 1),
                "epoch_seconds_last_epoch": round(sum(v for k, v in result.metrics.items()
                                                      if k.startswith("time/") and k != "time/data_loading"), 1),
                "run_seconds": round(time.perf_counter() - started, 1),
            }
            print(variant, json.dumps(results[variant]), flush=True)
    ray.shutdown()
    ours, baseline = results["precise_bn"], results["running_averages"]
    report = {
        "name": "precise_bn",
        "value": ours["dev_ccc_as_saved"]["arousal"],
        "unit": "development arousal CCC of the saved model in eval mode (demo config, precise BatchNorm)",
        "baseline": "the same training with BatchNorm's running averages (precise_bn.utterances=0), same run",
        "baseline_value": baseline["dev_ccc_as_saved"]["arousal"],
        "ratio": round(ours["dev_ccc_as_saved"]["arousal"] / baseline["dev_ccc_as_saved"]["arousal"], 2)
        if baseline["dev_ccc_as_saved"]["arousal"] else None,
        "command": "python bench/precise_bn_bench.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "details": {"epochs": args.epochs, "variants": results, "dataset_hash": dataset.dataset_hash,
                    "machine": f"{os.cpu_count()} CPUs ({cpu_model()}), no GPU", "code": git_commit(str(REPO)),
                    "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    }
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
