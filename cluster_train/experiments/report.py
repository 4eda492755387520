"""A sweep's report: the paper's tables, its Fig. 3, learning curves and a 2-D map of the embeddings,
as Markdown + PNG in a folder and as artifacts of the sweep's MLflow parent run.

    report = write_report(load_sweep_config("configs/sweep/ravdess_quarter.yaml"), "docs/results/ravdess-quarter")

Works on a sweep still training: it reports the trials trained so far (a table row says how many
runs it holds). It reads the trials' records (`SweepConfig.records`): their test-split predictions
(`records.trial_predictions`, predicting only those not there yet), curves and times. So it runs on
any machine that has the records; the two figures drawn from models need those models here, and
where they are elsewhere the report keeps the figure an earlier report drew from the same trials.
  - tables: mean test CCC per attribute over subsets x seeds, one t-test column per reference
    (the sweep's reference, and DeepEmoCluster where the sweep has it: the controls are tested
    against both)
  - Fig. 3: arousal histograms of the clusters with the highest and lowest mean arousal, for the
    model trained without the regressor (`stages=[1]`, the paper's "unsupervised") beside
    DeepEmoCluster: K-means (the run's settings) on the embeddings of every train chunk
  - learning curves: development CCC per epoch (the record's, from MLflow), mean over seeds, one
    line per point
  - projection: PCA of DeepEmoCluster's test-chunk embeddings, coloured by K-means cluster and by
    each attribute's label
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cluster_train.experiments.records import (
    development_markdown,
    development_ranking,
    prepared_dataset,
    records_folder,
    scored_predictions,
    trained_in_bf16,
    trained_run,
)
from cluster_train.experiments.sweep import SweepConfig, Trial, planned_with_search, recorded_search
from cluster_train.serve.evaluate import compare_models
from cluster_train.train.launch import pin_local_paths
from data_prep.dataset import PreparedDataset
from data_prep.manifest import ATTRIBUTES

MARKS = ("*", "†")  # significance against the first and the second reference


@dataclass
class TrainedTrial:
    trial: Trial
    run: dict  # the trial's record: best_model, mlflow_run_id, seconds, epochs_run, scores, curves

    def curve(self, key: str) -> list[float]:
        return self.run.get("curves", {}).get(key, [])

    def has_model(self) -> bool:
        from data_prep.storage import OutputFolder

        return OutputFolder(self.run["best_model"]).exists("model.pt")


@dataclass
class Report:
    markdown: str
    folder: Path
    tables: dict  # reference -> compare_models table
    trained: int
    planned: int


def trained_trials(config: SweepConfig) -> tuple[list[TrainedTrial], int]:
    """The sweep's trials trained so far, and how many it plans."""
    trials = planned_with_search(config)
    records = records_folder(config)
    found = []
    for trial in trials:
        run = trained_run(pin_local_paths(trial.config), records)
        if run is not None:
            found.append(TrainedTrial(trial, run))
    return found, len(trials)


def comparison_tables(config: SweepConfig, trained: list[TrainedTrial], dataset: PreparedDataset | None
                      ) -> dict[str, dict]:
    """Reference -> compare_models table over the points with a trained trial that learned a
    regressor (a stage-1-only model has an untrained one: it is in Fig. 3, not in the table)."""
    predictions, seeds = scored_predictions(config, ((item.trial, item.run) for item in trained), dataset)
    references = [config.reference or trained[0].trial.point]
    if "deepemocluster" in predictions and "deepemocluster" not in references:
        references.append("deepemocluster")
    return {reference: compare_models(predictions, reference, k=config.subsets, seeds=seeds)
            for reference in references if reference in predictions}


def _scored(trained: list[TrainedTrial]) -> list[TrainedTrial]:
    return [item for item in trained if item.trial.config.kind.trains_regressor]


def training_seconds(item: TrainedTrial) -> float:
    """Seconds a trial trains: its median epoch (`time/epoch`) x its epochs, so a trial resumed
    across sittings counts every epoch (its `seconds` count the last sitting only) and an epoch
    stretched by a paused or crowded machine does not count; else its `seconds`."""
    epochs = item.curve("time/epoch")
    return float(np.median(epochs) * len(epochs)) if epochs else float(item.run.get("seconds", float("nan")))


def table_markdown(tables: dict[str, dict], trained: list[TrainedTrial]) -> str:
    references = list(tables)
    first = tables[references[0]]
    seconds: dict[str, list[float]] = {}
    for item in trained:
        seconds.setdefault(item.trial.point, []).append(training_seconds(item))
    header = ("| point | runs | " + " | ".join(ATTRIBUTES) + " | "
              + " | ".join(f"p vs {r} (A / D / V)" for r in references) + " | minutes per run (median epoch x epochs) |")
    lines = [header, "|" + "---|" * (2 + len(ATTRIBUTES) + len(references) + 1)]
    for point, entry in first["models"].items():
        cells = []
        for attribute in ATTRIBUTES:
            row = entry["ccc"][attribute]
            marks = "".join(mark for mark, reference in zip(MARKS, references)
                            if tables[reference]["models"][point]["ccc"][attribute]["significant"])
            cells.append(f"{row['mean']:.3f} ± {row['std']:.3f}{marks}")
        p_values = []
        for reference in references:
            rows = tables[reference]["models"][point]["ccc"]
            p_values.append(" / ".join("—" if rows[a]["p_vs_reference"] is None else f"{rows[a]['p_vs_reference']:.3g}"
                                       for a in ATTRIBUTES))
        minutes = np.nanmean(seconds.get(point, [np.nan])) / 60
        lines.append(f"| {point} | {entry['runs']} | " + " | ".join(cells) + " | " + " | ".join(p_values)
                     + f" | {minutes:.0f} |")
    legend = "; ".join(f"{mark} p < {first['alpha']} against {reference}" for mark, reference in zip(MARKS, references))
    lines.append("")
    lines.append(f"Mean ± sd of test CCC over {first['subsets']} random test subsets x runs (seeds); two-tailed "
                 f"t-tests, paired by subset and seed on the seeds both points have (Welch's where they share none). "
                 f"{legend}.")
    return "\n".join(lines)


def learning_curves(trained: list[TrainedTrial], file: Path) -> bool:
    """Development CCC per epoch (the records' curves), mean over seeds, one line per point that
    learned a regressor."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 3.8), dpi=100)
    axes = figure.subplots(1, 3, sharey=True)
    drawn = False
    by_point: dict[str, list[TrainedTrial]] = {}
    for item in _scored(trained):
        by_point.setdefault(item.trial.point, []).append(item)
    for point, items in by_point.items():
        for axis, attribute in zip(axes, ATTRIBUTES):
            curves = [c for c in (item.curve(f"dev/ccc_{attribute}") for item in items) if c]
            if not curves:
                continue
            length = max(len(c) for c in curves)
            padded = np.array([c + [np.nan] * (length - len(c)) for c in curves])
            axis.plot(np.arange(1, length + 1), np.nanmean(padded, axis=0), marker=".", label=point)
            drawn = True
    for axis, attribute in zip(axes, ATTRIBUTES):
        axis.set_title(f"development CCC, {attribute}")
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    if drawn:
        figure.savefig(file)
    return drawn


def _split_embeddings(bundle, dataset: PreparedDataset, splits: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(chunk embeddings (N * C, d), labels per chunk (N * C, A)) of `splits`, the model in eval mode."""
    from cluster_train.data.labels import label_matrix

    table = dataset.read_table(splits, ["id", *ATTRIBUTES, "frames"])
    model = bundle.model.eval()
    features = []
    with torch.inference_mode():
        for start in range(0, table.num_rows, 64):
            chunks = dataset.frame_format.chunks_of(table.slice(start, 64)["frames"], bundle.chunks)
            x = bundle.normalizer.torch(torch.tensor(chunks).flatten(0, 1).float())
            features.append(model.embed(x).float().numpy())
    labels = np.repeat(label_matrix(table, ATTRIBUTES), bundle.chunks.num_chunks, axis=0)
    return np.concatenate(features), labels


def _clusters(features: np.ndarray, config, seed: int = 0) -> np.ndarray:
    from cluster_train.clustering.kmeans import fit_clusters

    return fit_clusters(features, config.clustering, seed)[1].assignments


def cluster_figure(models: dict[str, TrainedTrial], dataset: PreparedDataset, file: Path) -> dict[str, dict]:
    """The paper's Fig. 3 for each model given: arousal histograms of its highest- and lowest-arousal
    K-means clusters over the train chunks; returns the two means and their gap per model."""
    from matplotlib.figure import Figure

    from cluster_train.clustering.diagnostics import draw_arousal_histograms, extreme_clusters
    from cluster_train.serve.bundle import load_bundle

    figure = Figure(figsize=(5.5 * len(models), 3.6), dpi=100)
    axes = np.atleast_1d(figure.subplots(1, len(models), sharey=True))
    found = {}
    for axis, (title, item) in zip(axes, models.items()):
        features, labels = _split_embeddings(load_bundle(item.run["best_model"]), dataset,
                                             item.trial.config.data.labeled_splits)
        clusters = _clusters(features, item.trial.config, item.trial.seed)
        arousal = labels[:, 0]
        high, low, means = extreme_clusters(clusters, arousal)
        draw_arousal_histograms(axis, clusters, arousal, high, low)
        axis.set_title(f"{title}\n({item.trial.config.name})", fontsize=9)
        axis.set_xlabel("arousal label of the chunk's utterance (1-7)")
        found[title] = {"run": item.trial.config.name, "mean_high": means[high], "mean_low": means[low],
                        "gap": means[high] - means[low], "chunks": int(len(arousal))}
    axes[0].set_ylabel("density of train chunks")
    figure.tight_layout()
    figure.savefig(file)
    return found


def projection_figure(item: TrainedTrial, dataset: PreparedDataset, split: str, file: Path) -> None:
    """PCA of one model's `split` chunk embeddings: by K-means cluster, then by each attribute."""
    from matplotlib.figure import Figure

    from cluster_train.serve.bundle import load_bundle

    features, labels = _split_embeddings(load_bundle(item.run["best_model"]), dataset, [split])
    clusters = _clusters(features, item.trial.config, item.trial.seed)
    centred = features - features.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    points = centred @ components[:2].T
    figure = Figure(figsize=(16, 3.9), dpi=100)
    axes = figure.subplots(1, 4)
    axes[0].scatter(points[:, 0], points[:, 1], c=clusters, cmap="tab20", s=3)
    axes[0].set_title(f"K-means cluster (K={item.trial.config.clustering.num_clusters})")
    for axis, (index, attribute) in zip(axes[1:], enumerate(ATTRIBUTES)):
        shown = axis.scatter(points[:, 0], points[:, 1], c=labels[:, index], cmap="coolwarm", s=3)
        figure.colorbar(shown, ax=axis)
        axis.set_title(f"{attribute} label")
    for axis in axes:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(f"PCA of {item.trial.config.name}'s {split} chunk embeddings", fontsize=9)
    figure.tight_layout()
    figure.savefig(file)


def write_report(config: SweepConfig, folder: str | Path) -> Report:
    """Tables and figures of the trials trained so far into `folder` (report.md + PNGs + tables.json),
    and the same files as artifacts `report/` of the sweep's parent MLflow run."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    trained, planned = trained_trials(config)
    if not trained:
        raise ValueError(f"sweep {config.name}: no trial is trained yet ({planned} planned)")
    first = pin_local_paths(trained[0].trial.config)
    dataset = prepared_dataset(first)
    tables = comparison_tables(config, trained, dataset)
    (folder / "tables.json").write_text(json.dumps(tables, indent=1) + "\n")
    sections = [f"# Sweep {config.name}: {len(trained)} of {planned} trials trained", "",
                _dataset_line(dataset, trained, config.split), "",
                "## Development CCC", "", "The points ranked by their best models' development CCC (mean over "
                "seeds): what to choose settings by; the test CCC below reports them.", "",
                development_markdown(development_ranking((item.trial, item.run) for item in trained)), "",
                "## Test CCC", "", table_markdown(tables, trained), ""]
    bf16 = [item.trial.config.name for item in trained if trained_in_bf16(item.run)]
    sections += ["Precision (`precision/bf16` of each sitting): "
                 + (f"bf16 in {len(bf16)} of {len(trained)} trials ({', '.join(bf16)}), fp32 in the others; compare "
                    f"points within one precision." if bf16 else f"fp32 in all {len(trained)} trials."), ""]
    unscored = sorted({item.trial.point for item in trained} - {item.trial.point for item in _scored(trained)})
    if unscored:
        sections += [f"Not in the table: {', '.join(unscored)} (no stage learns from labels, so its regressor is "
                     f"untrained; it is there for Fig. 3).", ""]
    search = recorded_search(config)
    if search is not None:
        sections += ["## Search", "", search_markdown(search), ""]
    if learning_curves(trained, folder / "learning_curves.png"):
        sections += ["## Learning curves", "", "![learning curves](learning_curves.png)", ""]
    by_point = {item.trial.point: item for item in sorted(trained, key=lambda t: t.trial.seed, reverse=True)}
    pair = {name: by_point[point] for name, point in (("unsupervised only (no regressor)", "dec_unsupervised_only"),
                                                      ("DeepEmoCluster", "deepemocluster")) if point in by_point}
    figures = _ModelFigures(folder, dataset is not None)
    if pair:
        def draw_clusters(file: Path) -> list[str]:
            gaps = cluster_figure(pair, dataset, file)
            return [f"- {name} ({g['run']}): highest-arousal cluster mean {g['mean_high']:.2f}, lowest "
                    f"{g['mean_low']:.2f}, gap {g['gap']:.2f}" for name, g in gaps.items()]
        sections += figures.section("## Arousal per cluster (the paper's Fig. 3)", "clusters_arousal.png",
                                    list(pair.values()), draw_clusters)
    if "deepemocluster" in by_point:
        def draw_projection(file: Path) -> list[str]:
            projection_figure(by_point["deepemocluster"], dataset, config.split, file)
            return []
        sections += figures.section("## Embeddings in two dimensions", "projection.png",
                                    [by_point["deepemocluster"]], draw_projection)
    figures.save()
    markdown = "\n".join(sections)
    (folder / "report.md").write_text(markdown)
    _log_to_parent(config, first, folder)
    return Report(markdown, folder, tables, len(trained), planned)


def _dataset_line(dataset: PreparedDataset | None, trained: list[TrainedTrial], split: str) -> str:
    if dataset is not None:
        return f"Dataset `{dataset.location}` (hash {dataset.dataset_hash[:12]}), split `{split}`."
    hashes = sorted({item.run["dataset_hash"][:12] for item in trained if item.run.get("dataset_hash")})
    kept = f"hash {', '.join(hashes)} in the records that keep it" if hashes else "no record keeps its hash"
    return (f"Dataset `{trained[0].trial.config.data.dataset}`, split `{split}`: not prepared here, so the tables "
            f"are the predictions the records hold ({kept}).")


def search_markdown(search: dict) -> str:
    """The settings the search tried, best development loss first (`search.point` took the first)."""
    keys = list(search["trials"][0]["settings"])
    lines = [f"| {' | '.join(keys)} | development loss (sum of 1 - CCC) | epochs |", "|" + "---|" * (len(keys) + 2)]
    for trial in search["trials"]:
        values = " | ".join(f"{trial['settings'][k]:.4g}" if isinstance(trial["settings"][k], float)
                            else str(trial["settings"][k]) for k in keys)
        stopped = " (ended early)" if trial["stopped_early"] else ""
        lines.append(f"| {values} | {trial[search['metric']]:.4f} | {trial['epochs']}{stopped} |")
    return "\n".join(lines)


class _ModelFigures:
    """The figures drawn from trained models, which may be on another machine than the trials'
    records: drawn where the models are here, else kept from an earlier report of the same trials
    (`FILE` names the MLflow runs each figure was drawn from), else left out with the reason."""

    FILE = "model_figures.json"

    def __init__(self, folder: Path, dataset_here: bool):
        self.folder = folder
        self.dataset_here = dataset_here
        self.drawn = json.loads((folder / self.FILE).read_text()) if (folder / self.FILE).exists() else {}

    def section(self, title: str, file: str, items: list[TrainedTrial], draw) -> list[str]:
        runs = [item.run.get("mlflow_run_id") or item.trial.config.name for item in items]
        missing = ", ".join(f"the best model of {item.trial.config.name}" for item in items if not item.has_model())
        missing = ", ".join(filter(None, [missing, "" if self.dataset_here else "its dataset"]))
        if not missing:
            self.drawn[file] = {"runs": runs, "lines": draw(self.folder / file)}
        elif self.drawn.get(file, {}).get("runs") != runs or not (self.folder / file).exists():
            self.drawn.pop(file, None)
            return [title, "", f"Not drawn, not on this machine: {missing} (a record may come from another); run "
                    f"the report where the models and the prepared data are.", ""]
        return [title, "", f"![{file.removesuffix('.png')}]({file})", "", *self.drawn[file]["lines"], ""]

    def save(self) -> None:
        (self.folder / self.FILE).write_text(json.dumps(self.drawn, indent=1) + "\n")


def _log_to_parent(config: SweepConfig, train_config, folder: Path) -> None:
    """The report's files as artifacts `report/` of the sweep's parent run (its status untouched:
    a sweep still training keeps it RUNNING)."""
    from mlflow import MlflowClient

    from cluster_train.experiments.sweep import PARENT_FILE
    from data_prep.storage import OutputFolder

    sweep_folder = OutputFolder(f"{config.output.rstrip('/')}/{config.name}")
    if not train_config.tracking.enabled or not sweep_folder.exists(PARENT_FILE):
        return
    client = MlflowClient(train_config.tracking.tracking_uri)
    run_id = sweep_folder.read_json(PARENT_FILE)["run_id"]
    for file in sorted(folder.glob("*")):
        if file.is_file():
            client.log_artifact(run_id, str(file), "report")
