"""The epoch loop: one `Trainer`, the same under Ray Train (`train/ray_worker.py`) and in one plain
process (`train/runtime.py`, `scaling.num_workers=0`).

Each epoch, as the paper: embed every training chunk -> K-means (`clustering/labelers.py`) ->
pseudo-labels -> the model kind's stages (`model/kinds.py`: DeepEmoCluster's stage 1 on unlabeled
rows with the cluster head, stage 2 on labelled rows with all heads; the baselines' own) ->
development CCC -> checkpoint. The trainer asks the kind what to train and never which kind it is.

Before anything runs in eval mode (the embedding pass, validation, hence every saved model) the
BatchNorm statistics are recomputed for the current weights (`precise_bn.py`), the same on every
rank. Every random stream derives from `config.seed` (`seeding.py`). Metrics carry the prefixes the
MLflow UI groups into sections: `train/`, `dev/`, `cluster/`, `time/`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time

import numpy as np
import torch

from cluster_train.clustering.diagnostics import ClusterDiagnostics
from cluster_train.clustering.labelers import LabelTable, build_labeler, uniform_over_clusters
from cluster_train.console import epoch_line, print_line
from cluster_train.data.batches import Batch, ChunkBatches, InMemoryRows, RankSlice
from cluster_train.data.labels import LabelScaler
from cluster_train.distributed import Collective, weight_spread
from cluster_train.model.kinds import Stage
from cluster_train.model.losses import CCCSums, sentence_mean
from cluster_train.seeding import derive
from cluster_train.tracking import RunTracker
from cluster_train.train.checkpointer import Checkpointer, TrainState
from cluster_train.train.config import OptimizerConfig, TrainConfig
from cluster_train.train.precise_bn import recompute_batchnorm
from cluster_train.train.precision import Precision
from cluster_train.train.row_buffer import RowBuffer
from cluster_train.train.runtime import Runtime
from data_prep.config import to_yaml
from data_prep.dataset import PreparedDataset
from data_prep.shards import ChunkRecipe

RUN_DIR_TAG = "run_dir"  # the MLflow run's tag naming the training's folder (`TrainConfig.run_dir`)


def build_optimizer(params: list[torch.nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


class Trainer:
    """Built from parts in a fixed order: model, objective, optimizers, data, labeler, tracker,
    checkpointer; then restored from the runtime's latest checkpoint, if any."""

    def __init__(self, config: TrainConfig, runtime: Runtime, label_scaler: dict, service=None,
                 params: dict | None = None, tags: dict | None = None):
        self.config, self.runtime, self.rank = config, runtime, runtime.rank
        self.device = runtime.device
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
        torch.manual_seed(derive(config.seed, "model_init"))
        dataset = PreparedDataset(config.data.dataset)
        self.normalizer, self.scaler = dataset.normalizer(), LabelScaler.from_dict(label_scaler)
        # model and objective: the kind owns the network, its stages and their losses
        self.kind = config.kind
        # channels_last: 1.5x faster convolutions on CPU (measured here), the layout GPUs prefer too
        self.module = self.kind.build(config.model).to(memory_format=torch.channels_last)
        self.model = runtime.prepare_model(self.module, find_unused_parameters=self.kind.skips_parameters(self.module))
        self.precision = Precision.for_device(config.precision, self.device)
        self.optimizers = {group: build_optimizer(params, getattr(config.optim, group))
                           for group, params in self.module.param_groups().items()}
        # data
        self.batches = ChunkBatches(self.normalizer, self.scaler, self.device, dataset.frame_format, config.data.chunks)
        self.bn_rows = (InMemoryRows.read(runtime.shard("precise_bn")) if config.precise_bn.utterances else None)
        self.bn_current = False  # BatchNorm statistics recomputed since the weights last changed
        self.num_chunks = config.data.chunks.num_chunks
        # labeler: pseudo-labels whatever clustering.mode; diagnostics on rank 0 only
        self.collective = Collective()
        self.labeler = (build_labeler(config.clustering, service, self.collective, self.device, seed=config.seed)
                        if self.kind.clusters else None)
        cluster_splits = sorted({*config.data.unlabeled_splits, *config.data.labeled_splits})
        self.diagnostics = (ClusterDiagnostics.from_dataset(dataset, cluster_splits, self.num_chunks)
                            if self.labeler is not None and self.rank == 0 else None)
        self.cluster_sizes: np.ndarray | None = None  # this epoch's, for the stage-1 sampler
        self.sampler_generator = torch.Generator()
        # tracker (rank 0 writes) and checkpointer
        self.tracker = RunTracker(config.tracking, active=self.rank == 0)
        self.checkpointer = Checkpointer(config.model_kind, config.model, self.normalizer, self.scaler,
                                         ChunkRecipe.for_dataset(dataset.settings, config.data.chunks).settings())
        self.state = TrainState()
        self.best_weights = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        with runtime.resume_folder() as folder:
            if folder is not None:
                self.state, self.best_weights = self.checkpointer.read(folder, self.module, self.optimizers,
                                                                       self.device)
                self.bn_current = True  # saved after validation, with the statistics of these weights
        if self.rank == 0:
            new_run = self.state.run_id is None
            # a worker group restarted before its first checkpoint finds its run by the run's folder
            tags = {**(tags or {}), RUN_DIR_TAG: config.run_dir}
            self.state.run_id = self.tracker.start(params or {}, tags, run_id=self.state.run_id, key_tag=RUN_DIR_TAG)
            if not self.done:  # a finished run started again adds nothing to its curves
                self.tracker.log_metrics({"precision/bf16": float(self.precision.name == "bf16")}, step=self.state.epoch)
            if new_run:  # what this run trains with, overrides merged, before the first epoch
                self.tracker.log_text(to_yaml(config), "config.yaml")
                self.tracker.log_dataset("/".join(dataset.location.rstrip("/").split("/")[-2:]),
                                         dataset.dataset_hash, dataset.location)

    # --- one epoch --------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """Nothing left to train: every epoch trained, or stopped early (`patience`)."""
        return self.state.epochs_left(self.config.epochs, self.config.patience) == 0

    def fit(self) -> None:
        """Train the epochs left; none when the run (maybe resumed) is `done`."""
        while not self.done:
            epoch = self.state.epoch
            started = time.perf_counter()
            torch.manual_seed(derive(self.config.seed, "dropout", epoch, self.rank))  # resume-exact dropout
            metrics = self.run_epoch(epoch)
            if self.state.finish_epoch(epoch, metrics["dev/loss"], latest_is_best=not self.kind.trains_regressor):
                self.best_weights = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            best = {"dev/best_loss": self.state.best_dev_loss, "dev/best_epoch": self.state.best_epoch}
            checkpointing = time.perf_counter()
            self._report(metrics | best)
            done = time.perf_counter()
            closing = best | {"time/checkpoint": done - checkpointing, "time/epoch": done - started}
            self.tracker.log_metrics(closing, step=epoch)
            if self.rank == 0:
                print_line(epoch_line(metrics | closing, self.config.epochs, self.scaler.attributes, self.config.name or ""))

    def run_epoch(self, epoch: int) -> dict[str, float]:
        timings: dict[str, float] = {}
        metrics: dict[str, float] = {"epoch": epoch}
        loading_before = self.batches.loading_seconds
        pseudo = None
        if self.labeler is not None:
            self._refresh_batchnorm(timings)
            pseudo, cluster_metrics = self._pseudo_labels(epoch, timings)
            metrics |= cluster_metrics
        for stage in self.kind.stages:
            started = time.perf_counter()
            loss, chunks, steps = self._stage(stage, epoch, pseudo)
            name = f"train/stage{stage.number}"
            metrics |= {f"{name}_loss": loss, f"{name}_chunks": chunks, f"{name}_steps": steps}
            timings[f"stage{stage.number}"] = time.perf_counter() - started
        self._refresh_batchnorm(timings)
        started = time.perf_counter()
        metrics |= self.validate()
        timings["validation"] = time.perf_counter() - started
        metrics["train/rank_weight_spread"] = weight_spread(self.module, self.collective)
        # Part of the stage times above: waiting on the data and building batches.
        timings["data_loading"] = self.batches.loading_seconds - loading_before
        metrics |= {f"time/{name}": value for name, value in timings.items()}
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        return metrics

    def _refresh_batchnorm(self, timings: dict) -> None:
        """BatchNorm statistics for the current weights (`precise_bn.py`), unless already current;
        rank r takes batches r, r + W, ... of the fixed utterances and the sums are all-reduced."""
        if self.bn_rows is None or self.bn_current:
            return
        started = time.perf_counter()
        own = RankSlice(self.bn_rows, self.collective.rank, self.collective.world_size)
        with self.precision.autocast():
            recompute_batchnorm(self.module, (batch.chunks for batch in self.batches(
                own, self.config.data.batch_size, drop_last=False)), reduce=self.collective.sum)
        self.bn_current = True
        timings["precise_bn"] = timings.get("precise_bn", 0.0) + time.perf_counter() - started

    def _pseudo_labels(self, epoch: int, timings: dict) -> tuple[LabelTable, dict]:
        started = time.perf_counter()
        keys, features = self._embed(self.runtime.shard("cluster"))
        timings["embedding"] = time.perf_counter() - started
        started = time.perf_counter()
        result = self.labeler.label(epoch, keys, features, self.num_chunks)
        if self.config.clustering.pseudo_labels == "shuffled":  # the control: sizes kept, audio ignored
            generator = np.random.default_rng(derive(self.config.seed, "shuffled_labels", epoch))
            result = dataclasses.replace(result, table=result.table.shuffled(generator))
        timings["clustering"] = time.perf_counter() - started
        # Labels permute between clusterings: re-initialised layers, the same on every rank.
        generator = torch.Generator().manual_seed(derive(self.config.seed, "cluster_top", epoch))
        for group, params in self.kind.relabelled(self.module, self.config.clustering.num_clusters, generator).items():
            self.optimizers[group] = build_optimizer(params, getattr(self.config.optim, group))
        summary = result.summary
        sizes = self.cluster_sizes = np.asarray(summary["cluster_sizes"])
        self.sampler_generator.manual_seed(derive(self.config.seed, "stage1_sampler", epoch, self.rank))
        metrics = {"cluster/kmeans_objective": float(summary["objective"]), "cluster/size_min": float(sizes.min()),
                   "cluster/size_max": float(sizes.max()), "cluster/reseeded": float(summary["reseeded"]),
                   "cluster/actor_attempts": float(summary.get("actor_attempts", 1))}
        metrics |= {f"cluster_size/{k}": float(n) for k, n in enumerate(sizes)}
        if self.diagnostics is not None:
            diagnostics, figure = self.diagnostics.epoch(result.table, sizes)
            metrics |= diagnostics
            if figure is not None:
                self.tracker.log_figure(figure, f"clusters/arousal_epoch_{epoch:03d}.png")
        return result.table, metrics

    @torch.no_grad()
    def _embed(self, shard) -> tuple[np.ndarray, np.ndarray]:
        self.module.eval()
        keys, features = RowBuffer(), RowBuffer()  # not a list of small arrays: see row_buffer.py
        for batch in self.batches(shard, self.config.data.batch_size, drop_last=False):
            keys.append(batch.keys)
            with self.precision.autocast():
                embedded = self.module.embed(batch.chunks)
            features.append(embedded.float().cpu().numpy())
        if not len(keys):
            return np.empty(0, np.int64), np.empty((0, self.config.model.feature_dim), np.float32)
        return keys.array(), features.array()

    def _stage(self, stage: Stage, epoch: int, pseudo: LabelTable | None) -> tuple[float, int, int]:
        """Mean loss of the stage's passes over this rank's shard (`labeled_passes` for the labelled
        stage, else one), the chunks and the steps it trained on."""
        self.model.train()
        self.bn_current = False  # on every rank alike, whether or not its shard held a batch
        total, steps, chunks = 0.0, 0, 0
        passes = self.config.labeled_passes if stage.shard == "labeled" else 1
        for number in range(passes):  # pass p of epoch e shuffles as epoch e * passes + p
            shuffle = derive(self.config.seed, f"shuffle_stage{stage.number}", epoch * passes + number)
            shard = self.runtime.shard(stage.shard)
            for batch in self.batches(shard, self.config.data.batch_size, drop_last=True, seed=shuffle):
                batch = self._stage1_sample(stage, batch, pseudo)
                total, steps, chunks = total + self._step(stage, batch, pseudo), steps + 1, chunks + len(batch.keys)
        return total / max(steps, 1), chunks, steps

    def _step(self, stage: Stage, batch: Batch, pseudo: LabelTable | None) -> float:
        """One optimizer step of `stage`'s groups on `batch`; its loss."""
        for group in stage.groups:
            self.optimizers[group].zero_grad(set_to_none=True)
        labels = None if pseudo is None else torch.from_numpy(pseudo.lookup(batch.keys)).to(self.device)
        with self.precision.autocast():
            outputs = self.model(batch.chunks)
        loss = self.kind.loss(stage, Precision.outputs(outputs), batch.chunks, batch.targets, batch.num_chunks, labels)
        loss.backward()
        for group in stage.groups:
            self.optimizers[group].step()
        return float(loss.detach())

    def _stage1_sample(self, stage: Stage, batch: Batch, pseudo: LabelTable | None) -> Batch:
        """Stage 1 with clustering.stage1_sampler = "uniform": the batch's chunks redrawn uniformly
        over clusters (`uniform_over_clusters`); otherwise the batch as it is."""
        if stage.number != 1 or pseudo is None or self.config.clustering.stage1_sampler != "uniform":
            return batch
        index = uniform_over_clusters(pseudo.lookup(batch.keys), self.cluster_sizes, self.sampler_generator)
        return dataclasses.replace(batch, keys=batch.keys[index.numpy()], chunks=batch.chunks[index.to(batch.chunks.device)])

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Sentence-level CCC on the development split: each rank scores its part of it
        (`Runtime.shard`) and the CCC comes from the sums of all ranks (`CCCSums`)."""
        self.module.eval()
        sums = CCCSums(len(self.scaler.attributes))
        for batch in self.batches(self.runtime.shard("development"), self.config.data.batch_size, drop_last=False):
            with self.precision.autocast():
                prediction = self.module(batch.chunks)["prediction"].float()
            sums.add(sentence_mean(prediction, batch.num_chunks), batch.targets)
        values = sums.ccc(reduce=self.collective.sum)
        metrics = {f"dev/ccc_{a}": float(v) for a, v in zip(self.scaler.attributes, values)}
        return metrics | {"dev/loss": float((1 - values).sum())}

    # --- checkpoint ---------------------------------------------------------------------------------

    def _report(self, metrics: dict) -> None:
        metrics = metrics | {"mlflow_run_id": self.state.run_id or ""}
        if self.rank != 0:
            self.runtime.report(metrics, None)
            return
        with tempfile.TemporaryDirectory() as folder:
            self.checkpointer.write(folder, self.module, self.optimizers, self.state, self.best_weights, metrics)
            self.runtime.report(metrics, folder)


def train(config: TrainConfig, runtime: Runtime, label_scaler: dict, service=None, params: dict | None = None,
          tags: dict | None = None) -> TrainState:
    """Build the trainer and run it; a run that fails is marked FAILED in MLflow (a restarted worker
    group re-opens it), one that Ray Tune's scheduler stops KILLED."""
    trainer = Trainer(config, runtime, label_scaler, service, params, tags)
    try:
        trainer.fit()
    except SystemExit as stop:  # how Tune ends a trial it stopped: sys.exit(0) inside tune.report
        trainer.tracker.end("KILLED" if stop.code in (0, None) else "FAILED")
        raise
    except BaseException as error:
        trainer.tracker.fail(error)
        raise
    return trainer.state
