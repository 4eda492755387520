"""The epoch loop that runs on every Ray Train worker (`train_func`).

Each epoch, as the paper: embed every training chunk -> K-means (`clustering/labelers.py`, 3 modes) ->
pseudo-labels -> stage 1 on unlabeled rows (encoder + cluster head) -> stage 2 on labelled rows
(all heads) -> development loss -> checkpoint through `ray.train.report`. The paper's baselines run
in the same loop: the CNN-regressor skips stage 1, the CNN-AE / CNN-VAE train stage 1 on
reconstruction (+ KL) instead of pseudo-labels.

Before anything runs in eval mode (the embedding pass, validation, hence every saved model) the
BatchNorm statistics are recomputed for the current weights (`train/precise_bn.py`), the same on every
rank. Every random stream derives from `config.seed` (`seeding.py`). Metrics carry the prefixes the
MLflow UI groups into sections: `train/`, `dev/`, `cluster/`, `time/`.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from cluster_train.clustering.diagnostics import ClusterDiagnostics
from cluster_train.clustering.labelers import LabelTable, build_labeler, uniform_over_clusters
from cluster_train.console import epoch_line, print_line, quiet_process
from cluster_train.data.batches import Batch, ChunkBatches, InMemoryRows, ShardCache
from cluster_train.data.labels import LabelScaler
from cluster_train.distributed import Collective
from cluster_train.model.kinds import build_model
from cluster_train.model.losses import ccc, ccc_loss, cluster_ce, reconstruction_loss, sentence_mean, vae_kl
from cluster_train.seeding import derive
from cluster_train.serve.bundle import load_bundle, save_bundle
from cluster_train.tracking import RunTracker
from cluster_train.train.config import OptimizerConfig, TrainConfig
from cluster_train.train.precise_bn import recompute_batchnorm
from data_prep.config import to_yaml
from data_prep.dataset import PreparedDataset

STATE_FILE = "trainer_state.pt"
BEST_DIR = "best"


@dataclass
class TrainState:
    """Everything besides weights and optimizers that a resumed run needs to go on exactly."""

    epoch: int = 0  # the next epoch to run
    best_dev_loss: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    run_id: str | None = None

    def finish_epoch(self, epoch: int, dev_loss: float) -> bool:
        """Record epoch `epoch`'s development loss; True when it is the best so far (keep its model)."""
        improved = dev_loss < self.best_dev_loss
        if improved:
            self.best_dev_loss, self.best_epoch, self.bad_epochs = dev_loss, epoch, 0
        else:
            self.bad_epochs += 1
        self.epoch = epoch + 1
        return improved

    def should_stop(self, patience: int) -> bool:
        """Early stopping: `patience` epochs in a row without a better development loss."""
        return self.bad_epochs >= patience


def build_optimizer(params: list[torch.nn.Parameter], config: OptimizerConfig) -> torch.optim.Optimizer:
    if config.name == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def optimizer_config(group: str, config: TrainConfig) -> OptimizerConfig:
    return {"encoder_and_cluster": config.optim.encoder}.get(group) or getattr(config.optim, group)


class Trainer:
    def __init__(self, config: TrainConfig, label_scaler: dict, service, params: dict, tags: dict,
                 cache_shards: bool = False):
        context = ray.train.get_context()
        self.config, self.rank = config, context.get_world_rank()
        self.device = ray.train.torch.get_device()
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
        torch.manual_seed(derive(config.seed, "model_init"))
        dataset = PreparedDataset(config.data.dataset)
        self.normalizer, self.scaler = dataset.normalizer(), LabelScaler.from_dict(label_scaler)
        self.dataset_settings = dataset.settings  # saved with the best model: prediction recomputes its chunks
        # channels_last: 1.5x faster convolutions on CPU (measured here), the layout GPUs prefer too
        self.module = build_model(config.model_kind, config.model).to(memory_format=torch.channels_last)
        self.model = ray.train.torch.prepare_model(
            self.module, parallel_strategy_kwargs={"find_unused_parameters": True}
        )
        self.optimizers = {
            group: build_optimizer(params, optimizer_config(group, config))
            for group, params in self.module.param_groups().items()
        }
        self.batches = ChunkBatches(self.normalizer, self.scaler, self.device)
        self.shards = ShardCache(cache_shards)  # name -> this rank's rows: Ray Data's, or kept in memory
        self.service = service  # the KMeansService actor handle: None for the baselines and mode "allreduce"
        self.collective = Collective()
        # Pseudo-labels, whatever clustering.mode (pseudo_labels.py); diagnostics on rank 0 only.
        self.labeler = (build_labeler(config.clustering, service, self.collective, self.device, seed=config.seed)
                        if config.clusters else None)
        # The fixed utterances BatchNorm statistics are recomputed on; every rank holds all of them.
        self.bn_rows = (InMemoryRows.read(ray.train.get_dataset_shard("precise_bn"))
                        if config.precise_bn.utterances else None)
        self.bn_current = False  # recomputed since the weights last changed
        self.num_chunks = int(dataset.settings["chunks"]["num_chunks"])
        cluster_splits = sorted({*config.data.unlabeled_splits, *config.data.labeled_splits})
        self.diagnostics = (ClusterDiagnostics.from_dataset(dataset, cluster_splits, self.num_chunks)
                            if config.clusters and context.get_world_rank() == 0 else None)
        self.cluster_sizes: np.ndarray | None = None  # this epoch's, for the stage-1 sampler
        self.sampler_generator = torch.Generator()
        self.state = TrainState()
        self.best_weights = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        self._restore(ray.train.get_checkpoint())
        self.tracker = RunTracker(config.tracking, active=self.rank == 0)
        if self.rank == 0:
            new_run = self.state.run_id is None
            self.state.run_id = self.tracker.start(params, tags, run_id=self.state.run_id)
            if new_run:  # what this run trains with, overrides merged, before the first epoch
                self.tracker.log_text(to_yaml(config), "config.yaml")
                self.tracker.log_dataset("/".join(dataset.location.rstrip("/").split("/")[-2:]),
                                         dataset.dataset_hash, dataset.location)

    # --- one epoch --------------------------------------------------------------------------------

    def fit(self) -> None:
        for epoch in range(self.state.epoch, self.config.epochs):
            started = time.perf_counter()
            torch.manual_seed(derive(self.config.seed, "dropout", epoch, self.rank))  # resume-exact dropout
            metrics = self.run_epoch(epoch)
            if self.state.finish_epoch(epoch, metrics["dev/loss"]):
                self.best_weights = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            best = {"dev/best_loss": self.state.best_dev_loss, "dev/best_epoch": self.state.best_epoch}
            checkpointing = time.perf_counter()
            self._report(metrics | best)
            done = time.perf_counter()
            closing = best | {"time/checkpoint": done - checkpointing, "time/epoch": done - started}
            self.tracker.log_metrics(closing, step=epoch)
            if self.rank == 0:
                print_line(epoch_line(metrics | closing, self.config.epochs, self.scaler.attributes))
            if self.state.should_stop(self.config.patience):
                break

    def run_epoch(self, epoch: int) -> dict[str, float]:
        timings: dict[str, float] = {}
        metrics: dict[str, float] = {"epoch": epoch}
        loading_before = self.batches.loading_seconds
        pseudo = None
        if self.labeler is not None:
            self._refresh_batchnorm(timings)
            pseudo, cluster_metrics = self._pseudo_labels(epoch, timings)
            metrics |= cluster_metrics
        if self.config.model_kind != "cnn_regressor":
            started = time.perf_counter()
            metrics["train/stage1_loss"], metrics["train/stage1_chunks"] = self._stage(1, "unlabeled", epoch, pseudo)
            timings["stage1"] = time.perf_counter() - started
        started = time.perf_counter()
        metrics["train/stage2_loss"], metrics["train/stage2_chunks"] = self._stage(2, "labeled", epoch, pseudo)
        timings["stage2"] = time.perf_counter() - started
        self._refresh_batchnorm(timings)
        started = time.perf_counter()
        metrics |= self.validate()
        timings["validation"] = time.perf_counter() - started
        metrics["train/rank_weight_spread"] = self._rank_weight_spread()
        # Part of the stage times above: waiting on Ray Data and building batches.
        timings["data_loading"] = self.batches.loading_seconds - loading_before
        metrics |= {f"time/{name}": value for name, value in timings.items()}
        self.tracker.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)
        return metrics

    def _refresh_batchnorm(self, timings: dict) -> None:
        """BatchNorm statistics for the current weights (`train/precise_bn.py`), unless already current;
        rank r takes batches r, r + W, ... of the fixed utterances and the sums are all-reduced."""
        if self.bn_rows is None or self.bn_current:
            return
        started = time.perf_counter()
        world, rank = self.collective.world_size, self.collective.rank

        def own_batches() -> Iterator[torch.Tensor]:
            for index, batch in enumerate(self.batches(self.bn_rows, self.config.data.batch_size, drop_last=False)):
                if index % world == rank:
                    yield batch.chunks

        recompute_batchnorm(self.module, own_batches(), reduce=self.collective.sum)
        self.bn_current = True
        timings["precise_bn"] = timings.get("precise_bn", 0.0) + time.perf_counter() - started

    def _pseudo_labels(self, epoch: int, timings: dict) -> tuple[LabelTable, dict]:
        started = time.perf_counter()
        keys, features = self._embed(self.shards("cluster", ray.train.get_dataset_shard("cluster")))
        timings["embedding"] = time.perf_counter() - started
        started = time.perf_counter()
        result = self.labeler.label(epoch, keys, features, self.num_chunks)
        timings["clustering"] = time.perf_counter() - started
        # Labels permute between clusterings: a new top layer, the same on every rank.
        generator = torch.Generator().manual_seed(derive(self.config.seed, "cluster_top", epoch))
        top = self.module.cluster_head.reset_top(self.config.model.num_clusters, generator=generator)
        self.optimizers["cluster_top"] = build_optimizer(list(top.parameters()), self.config.optim.cluster_top)
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
        keys, features = [], []
        for batch in self.batches(shard, self.config.data.batch_size, drop_last=False):
            keys.append(batch.keys)
            features.append(self.module.embed(batch.chunks).float().cpu().numpy())
        if not keys:
            return np.empty(0, np.int64), np.empty((0, self.config.model.feature_dim), np.float32)
        return np.concatenate(keys), np.concatenate(features)

    def _stage(self, stage: int, shard_name: str, epoch: int, pseudo) -> tuple[float, int]:
        """Mean loss of one pass over this rank's shard, and the chunks it trained on."""
        self.model.train()
        self.bn_current = False  # on every rank alike, whether or not its shard held a batch
        groups = [g for g in self.optimizers if stage == 2 or g != "regressor"]
        total, steps, chunks = 0.0, 0, 0
        shard = self.shards(shard_name, ray.train.get_dataset_shard(shard_name))
        shuffle = derive(self.config.seed, f"shuffle_stage{stage}", epoch)
        for batch in self.batches(shard, self.config.data.batch_size, drop_last=True, seed=shuffle):
            for group in groups:
                self.optimizers[group].zero_grad(set_to_none=True)
            batch = self._stage1_sample(stage, batch, pseudo)
            loss = self._loss(stage, self.model(batch.chunks), batch, pseudo)
            loss.backward()
            for group in groups:
                self.optimizers[group].step()
            total, steps, chunks = total + float(loss.detach()), steps + 1, chunks + len(batch.keys)
        return total / max(steps, 1), chunks

    def _loss(self, stage: int, out: dict, batch: Batch, pseudo) -> torch.Tensor:
        config, kind = self.config, self.config.model_kind
        loss = torch.zeros((), device=self.device)
        if stage == 2:
            loss = loss + ccc_loss(sentence_mean(out["prediction"], batch.num_chunks), batch.targets)
        if kind == "deepemocluster":
            weight = config.cluster_weight if stage == 2 else 1.0
            loss = loss + weight * cluster_ce(out["cluster_logits"], self._lookup(pseudo, batch.keys))
        if kind in ("cnn_ae", "cnn_vae"):
            loss = loss + config.reconstruction_weight * reconstruction_loss(out["reconstruction"], batch.chunks)
        if kind == "cnn_vae":
            loss = loss + config.kl_weight * vae_kl(out["mu"], out["logvar"], elements=batch.chunks[0].numel())
        return loss

    def _lookup(self, table: LabelTable, keys: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(table.lookup(keys)).to(self.device)

    def _stage1_sample(self, stage: int, batch: Batch, pseudo: LabelTable | None) -> Batch:
        """Stage 1 with clustering.stage1_sampler = "uniform": the batch's chunks redrawn uniformly
        over clusters (`uniform_over_clusters`); otherwise the batch as it is."""
        if stage != 1 or pseudo is None or self.config.clustering.stage1_sampler != "uniform":
            return batch
        index = uniform_over_clusters(pseudo.lookup(batch.keys), self.cluster_sizes, self.sampler_generator)
        return dataclasses.replace(batch, keys=batch.keys[index.numpy()], chunks=batch.chunks[index.to(batch.chunks.device)])

    @torch.no_grad()
    def _rank_weight_spread(self) -> float:
        """The largest difference between this rank and rank 0 in any parameter tensor's sum, over
        all ranks: 0 while DDP keeps their weights equal (a rank resumed with another's optimizer
        state, or a differently seeded layer, makes it grow)."""
        sums = np.array([float(p.detach().double().sum()) for p in self.module.parameters()])
        gathered = np.stack(self.collective.gather_all(sums))
        return float(np.abs(gathered - gathered[0]).max())

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Sentence-level CCC on the development split (every worker reads all of it)."""
        self.module.eval()
        predictions, targets = [], []
        shard = self.shards("development", ray.train.get_dataset_shard("development"))
        for batch in self.batches(shard, self.config.data.batch_size, drop_last=False):
            predictions.append(sentence_mean(self.module(batch.chunks)["prediction"], batch.num_chunks))
            targets.append(batch.targets)
        values = ccc(torch.cat(predictions), torch.cat(targets))
        metrics = {f"dev/ccc_{a}": float(v) for a, v in zip(self.scaler.attributes, values)}
        return metrics | {"dev/loss": float((1 - values).sum())}

    # --- checkpoint ---------------------------------------------------------------------------------

    def _report(self, metrics: dict) -> None:
        metrics = metrics | {"mlflow_run_id": self.state.run_id or ""}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save(
                {
                    "model": self.module.state_dict(),
                    "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
                    "state": dataclasses.asdict(self.state),
                },
                Path(folder) / STATE_FILE,
            )
            best = build_model(self.config.model_kind, self.config.model)
            best.load_state_dict(self.best_weights)
            extra = {"epoch": self.state.best_epoch, "dev_loss": self.state.best_dev_loss}
            save_bundle(str(Path(folder) / BEST_DIR), best, self.config.model_kind, self.config.model,
                        self.normalizer, self.scaler, extra=extra, features=self.dataset_settings)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))

    def _restore(self, checkpoint: ray.train.Checkpoint | None) -> None:
        if checkpoint is None:
            return
        with checkpoint.as_directory() as folder:
            saved = torch.load(Path(folder) / STATE_FILE, map_location=self.device, weights_only=True)
            self.best_weights = load_bundle(str(Path(folder) / BEST_DIR)).model.state_dict()
        self.module.load_state_dict(saved["model"])
        self.bn_current = True  # saved after validation, with the statistics recomputed for these weights
        if "cluster_top" in self.optimizers:  # re-created every epoch; skip a stale state
            saved["optimizers"].pop("cluster_top", None)
        for name, state in saved["optimizers"].items():
            self.optimizers[name].load_state_dict(state)
        self.state = TrainState(**saved["state"])


def train_func(loop_config: dict) -> None:
    """What each Ray Train worker runs. A run that fails is marked FAILED in MLflow (a restarted
    worker group re-opens it)."""
    quiet_process(loop_config.get("verbose", False))
    trainer = Trainer(loop_config["config"], loop_config["label_scaler"], loop_config["service"],
                      dict(loop_config["params"]), dict(loop_config["tags"]), loop_config.get("cache_shards", False))
    try:
        trainer.fit()
    except BaseException as error:
        trainer.tracker.fail(error)
        raise
