"""What a restart needs, in one folder: the weights, the optimizers, the loop's `TrainState`, and
the best model so far as a bundle (`serve/bundle.py`), which is also what a run hands on; and the
epoch's report (`REPORT_FILE`: its metrics and `TrainState` as JSON), which a finished run started
again hands back and which says how far a run got without loading its weights."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cluster_train.data.labels import LabelScaler
from cluster_train.model.blocks import ModelConfig
from cluster_train.model.kinds import build_model
from cluster_train.serve.bundle import load_bundle, save_bundle
from data_prep.stats import Normalizer
from data_prep.storage import read_bytes

STATE_FILE = "trainer_state.pt"
BEST_DIR = "best"
REPORT_FILE = "report.json"


@dataclass
class TrainState:
    """Everything besides weights and optimizers that a resumed run needs to go on exactly."""

    epoch: int = 0  # the next epoch to run
    best_dev_loss: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    run_id: str | None = None

    def finish_epoch(self, epoch: int, dev_loss: float, latest_is_best: bool = False) -> bool:
        """Record epoch `epoch`'s development loss; True when it is the best so far (keep its model).
        `latest_is_best`: every epoch is (a run the development loss cannot judge keeps its last
        epoch and never stops early)."""
        improved = latest_is_best or dev_loss < self.best_dev_loss
        if improved:
            self.best_dev_loss, self.best_epoch, self.bad_epochs = dev_loss, epoch, 0
        else:
            self.bad_epochs += 1
        self.epoch = epoch + 1
        return improved

    def should_stop(self, patience: int) -> bool:
        """Early stopping: `patience` epochs in a row without a better development loss."""
        return self.bad_epochs >= patience

    def epochs_left(self, epochs: int, patience: int) -> int:
        """Epochs a run of `epochs` still trains from here: none once it stopped early."""
        return 0 if self.should_stop(patience) else max(0, epochs - self.epoch)


@dataclass
class Checkpointer:
    model_kind: str
    model_config: ModelConfig
    normalizer: Normalizer
    scaler: LabelScaler
    features: dict  # the chunk settings (`ChunkRecipe.settings`): prediction recomputes the chunks from them

    def write(self, folder: str, module: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
              state: TrainState, best_weights: dict[str, torch.Tensor], metrics: dict) -> None:
        """`metrics`: what the epoch reports (`REPORT_FILE`)."""
        torch.save({"model": module.state_dict(),
                    "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                    "state": dataclasses.asdict(state)}, Path(folder) / STATE_FILE)
        best = build_model(self.model_kind, self.model_config)
        best.load_state_dict(best_weights)
        save_bundle(str(Path(folder) / BEST_DIR), best, self.model_kind, self.model_config, self.normalizer,
                    self.scaler, extra={"epoch": state.best_epoch, "dev_loss": state.best_dev_loss},
                    features=self.features)
        report = {"metrics": metrics, "state": dataclasses.asdict(state)}
        (Path(folder) / REPORT_FILE).write_text(json.dumps(report, indent=1))

    def read(self, folder: str, module: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
             device: torch.device) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """Load `folder` into `module` and `optimizers`; the state and the best weights."""
        saved = torch.load(Path(folder) / STATE_FILE, map_location=device, weights_only=True)
        best_weights = load_bundle(str(Path(folder) / BEST_DIR)).model.state_dict()
        module.load_state_dict(saved["model"])
        for name, state in saved["optimizers"].items():
            optimizers[name].load_state_dict(state)
        return TrainState(**saved["state"]), best_weights


def read_report(folder: str) -> tuple[dict, TrainState] | None:
    """The metrics and `TrainState` a checkpoint folder (a local path or a URI) reported; None where
    it has no report: cut short, or written before reports were."""
    try:
        report = json.loads(read_bytes(f"{folder.rstrip('/')}/{REPORT_FILE}"))
    except FileNotFoundError:
        return None
    return report["metrics"], TrainState(**report["state"])
