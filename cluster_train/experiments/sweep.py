"""A sweep: one training run per grid point and seed, then the paper's comparison table.

    config = load_sweep_config("configs/sweep/paper_ravdess.yaml", overrides)
    result = run_sweep(config)   # trains what is not trained yet, scores, writes <output>/<name>/table.json

Every trial is the ordinary training job (`launch.run_training`) with the grid point's and the seed's
overrides. Grid points are the named `points` (a control is a point: a model kind with the settings
that make it one) crossed with every combination of `grid`. Each trial's MLflow run is a child of the
sweep's parent run, in the experiment named after the sweep, so the UI shows them side by side.
All trials' configs are checked before anything trains, and the sweep prints how long it expects
to take (`estimate.py`: steps timed here). The trials run as Ray Tune trials (`tuning.py`), up to
`max_concurrent` at once; a finished trial leaves a record (`records.py`) and is not trained again,
here or on any machine that has the record; a sweep killed mid-way, run again, is restored by Tune
and a cut trial goes on from its last checkpoint. A `search` section first searches settings on
development CCC and adds the chosen ones to the table as a point of their own.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from omegaconf import MISSING

from cluster_train.experiments.records import (
    development_ranking,
    records_folder,
    scored_predictions,
    trained_in_bf16,
    trained_run,
)
from cluster_train.train.config import TrainConfig, load_train_config
from cluster_train.train.launch import pin_local_paths
from data_prep.config import ConfigError, load_config, require, require_choice, to_flat_dict
from data_prep.storage import OutputFolder

SPACE_KINDS = ("choice", "uniform", "loguniform", "randint")  # randint: [low, high), high excluded


@dataclass(kw_only=True)
class SearchConfig:
    """A search over training settings on development CCC (`experiments/tuning.py`), then the
    chosen settings retrained over the sweep's seeds and compared on test with the sweep's points."""

    # training key -> {choice: [v, ...]} | {uniform: [low, high]} | {loguniform: [low, high]} | {randint: [low, high]}
    space: dict[str, dict[str, Any]] = MISSING
    samples: int = 8  # settings tried
    algorithm: str = "optuna"  # optuna (TPE) | random
    startup_samples: int = 4  # optuna: random samples before TPE models the results
    scheduler: str = "asha"  # asha (ends poor trials early) | none
    grace_epochs: int = 2  # ASHA: epochs every trial trains before it can be ended (fewer than its epochs)
    reduction_factor: int = 2  # ASHA: 1 in this many goes on at each rung
    seed: int = 0  # the search trials' training seed, and the algorithm's
    point: str = "searched"  # the name of the chosen settings' point in the table

    def __post_init__(self) -> None:
        require(len(self.space) > 0, "search.space", "name at least one training key")
        for key, spec in self.space.items():
            where = f"search.space.{key}"
            require(isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SPACE_KINDS, where,
                    f"one of {{{', '.join(f'{k}: ...' for k in SPACE_KINDS)}}}, not {spec!r}")
            [(kind, values)] = spec.items()
            require(isinstance(values, list) and len(values) >= (1 if kind == "choice" else 2), where,
                    f"{kind} takes a list ({'the values' if kind == 'choice' else '[low, high]'}), not {values!r}")
            if kind != "choice":
                require(len(values) == 2 and values[0] < values[1], where, f"{kind}: [low, high] with low < high")
            require(kind != "loguniform" or values[0] > 0, where, "loguniform: low must be > 0")
        require(self.samples >= 1, "search.samples", "must be >= 1")
        require_choice(self.algorithm, "search.algorithm", ("optuna", "random"))
        require_choice(self.scheduler, "search.scheduler", ("asha", "none"))
        require(self.grace_epochs >= 1, "search.grace_epochs", "must be >= 1")
        require(self.reduction_factor >= 2, "search.reduction_factor", "must be >= 2")

    def corners(self) -> list[dict[str, Any]]:
        """Settings at the ends of every range and each choice: checked as configs before Ray starts."""
        found = []
        for key, spec in self.space.items():
            [(kind, values)] = spec.items()
            ends = values if kind == "choice" else [values[0], values[1] - 1 if kind == "randint" else values[1]]
            found += [{key: value} for value in ends]
        return found


@dataclass(kw_only=True)
class SweepConfig:
    name: str = MISSING  # the MLflow experiment and the folder of the results
    train_config: str = MISSING  # a training config file (configs/train/...)
    overrides: list[str] = field(default_factory=list)  # key=value for every trial
    # Named grid points, {name: label, key: value, ...} each, crossed with `grid`; a point's own
    # `seeds: [...]` replaces the sweep's (controls and secondary tables may take fewer). Empty: one
    # unnamed point.
    points: list[dict[str, Any]] = field(default_factory=list)
    grid: dict[str, list[Any]] = field(default_factory=dict)  # training key -> values; every combination
    seeds: list[int] = field(default_factory=lambda: [0])  # trials per grid point (the paper: 5)
    reference: str | None = None  # the grid point the others are tested against; None: the first
    split: str = "test"  # the split the table compares the points on
    subsets: int = 4  # random equal parts of the split per trial (the paper: 4)
    max_concurrent: int = 1  # trials Tune runs at once
    # Times Tune starts a failed trial again (it goes on from its last checkpoint): a lost node, a
    # killed worker. A trial that fails once more is reported, and the sweep run again retries it.
    trial_retries: int = 2
    output: str = "outputs/sweeps"  # <output>/<name>/: the table, the parent run's id, Tune's experiments
    # One JSON file per finished trial: its config, scores, MLflow run id, development CCC and
    # seconds per epoch, and its predictions on `split`. A trial with its file there is done, on any
    # machine, with or without its model: a folder under version control or in a bucket carries a
    # sweep from machine to machine (docs/RESULTS.md's sweeps keep theirs in docs/results/). None:
    # <output>/<name>/trials.
    records: str | None = None
    # Trials are named <trial_prefix>-<point>-seed<n> (None: the sweep's name): a sweep that shares
    # another's records folder and prefix reuses that sweep's trials of the same config.
    trial_prefix: str | None = None
    search: SearchConfig | None = None  # a search first; its chosen settings join `points`

    def __post_init__(self) -> None:
        require(len(self.seeds) > 0, "seeds", "name at least one seed")
        require(self.subsets >= 1, "subsets", "must be >= 1")
        require(self.max_concurrent >= 1, "max_concurrent", "must be >= 1")
        require(self.trial_retries >= 0, "trial_retries", "must be >= 0")
        require(re.fullmatch(r"[A-Za-z0-9_.-]+", self.name) is not None, "name", "letters, digits, _ . - only")
        for key, values in self.grid.items():
            require(len(values) > 0, f"grid.{key}", "give at least one value")
            require(key != "seed", f"grid.{key}", "seeds go in `seeds`, not in the grid")
        for index, point in enumerate(self.points):
            require("seed" not in point, f"points[{index}].seed", "seeds go in `seeds`")
            require(bool(set(point) - {"name", "seeds"}), f"points[{index}]", "names no setting")
            require(len(point.get("seeds", [0])) > 0, f"points[{index}].seeds", "name at least one seed")
        labels = [label for label, _, _ in grid_points(self)]
        require(len(set(labels)) == len(labels), "points", f"two points have one label: {labels}")


@dataclass(frozen=True)
class Trial:
    point: str  # the grid point, e.g. "model_kind=cnn_ae"; "base" for an empty grid
    seed: int
    config: TrainConfig


@dataclass
class SweepResult:
    table: dict  # evaluation.compare_models output
    runs: list[dict]  # per trial: point, seed, run name, best model, MLflow run id, seconds
    table_file: str


def load_sweep_config(path: str | Path | None, overrides: Sequence[str] = ()) -> SweepConfig:
    return load_config(SweepConfig, path, overrides)


def grid_points(config: SweepConfig) -> list[tuple[str, dict[str, Any], list[int]]]:
    """(label, settings, seeds) of every point: each named point (or one empty point) with each
    combination of the grid. The label is the point's name, else its settings, then the grid's
    values, e.g. "deepemocluster,clustering.num_clusters=20" or "model_kind=cnn_regressor"."""
    keys = list(config.grid)
    combinations = [dict(zip(keys, values)) for values in itertools.product(*(config.grid[k] for k in keys))]
    found = []
    for point in config.points or [{}]:
        settings = {key: value for key, value in point.items() if key not in ("name", "seeds")}
        seeds = [int(seed) for seed in point.get("seeds", config.seeds)]
        for combination in combinations:
            named = [str(point["name"])] if "name" in point else _labels(settings)
            found.append((",".join([*named, *_labels(combination)]) or "base", {**settings, **combination}, seeds))
    return found


def _labels(settings: dict[str, Any]) -> list[str]:
    return [f"{key}={_override_value(value)}" for key, value in settings.items()]


def _override_value(value: Any) -> str:
    """A YAML value as an override's right-hand side (lists as [a,b])."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def plan_trials(config: SweepConfig, only: Sequence[str] = ()) -> list[Trial]:
    """Every trial's training config, validated: a wrong key or value fails here, before Ray starts.
    `only`: these grid points and the reference (the table needs it), in the config's order (the
    search's point, which only the search can plan, is left out)."""
    selecting = len(only) > 0
    only = [name for name in only if config.search is None or name != config.search.point]
    trials = []
    points = grid_points(config)
    labels = [label for label, _, _ in points]
    unknown = [name for name in only if name not in labels]
    if unknown:
        raise ConfigError(f"--only: {', '.join(map(repr, unknown))} is none of the grid points {labels}")
    for label, settings, seeds in points:
        if selecting and label not in only and label != (config.reference or labels[0]):
            continue
        for seed in seeds:
            slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)
            name = f"{config.trial_prefix or config.name}-{slug}-seed{seed}"
            trials.append(Trial(label, seed, trial_config(config, settings, seed, name, f"trial {label} seed {seed}")))
    if config.reference is not None and config.reference not in labels:
        raise ConfigError(f"config key 'reference': {config.reference!r} is none of the grid points {labels}")
    return trials


def trial_config(config: SweepConfig, settings: dict[str, Any], seed: int, name: str, what: str,
                 extra: Sequence[str] = ()) -> TrainConfig:
    """The training config of one trial: the sweep's file and overrides, then `settings`."""
    overrides = [*(f"{k}={_override_value(v)}" for k, v in settings.items()), f"seed={seed}", f"name={name}",
                 f"tracking.experiment={config.name}", *extra]
    try:  # the file and the sweep's overrides serve every kind: a trial keeps what its kind reads
        return load_train_config(config.train_config, overrides, shared_overrides=config.overrides)
    except ConfigError as error:
        raise ConfigError(f"sweep {config.name}, {what}: {error}") from error


PARENT_FILE = "parent_run.json"  # beside table.json: the sweep's MLflow parent run, re-opened on a rerun


def run_sweep(config: SweepConfig, only: Sequence[str] = ()) -> SweepResult:
    """Search first when the sweep has a search; then train every trial not trained yet as a Tune
    grid (`experiments/tuning.py`, saying first how long it should take), score every trial's best
    model on `split`, write `<output>/<name>/table.json` and log it to the sweep's parent run.
    `only`: train and compare these grid points (and the reference) now, the others later."""
    from cluster_train.experiments import tuning
    from cluster_train.serve.evaluate import compare_models
    from data_prep.dataset import PreparedDataset

    searching = config.search is not None and (not only or config.search.point in only)
    trials = [dataclasses.replace(t, config=pin_local_paths(t.config)) for t in plan_trials(config, only)]
    if searching:
        check_search(config)
    dataset = PreparedDataset(trials[0].config.data.dataset)  # a missing dataset fails before training
    folder = OutputFolder(f"{config.output.rstrip('/')}/{config.name}")
    folder.make()
    records = records_folder(config)
    # a trial trained with another config fails here, before the parent run or any training
    runs: list[dict | BaseException | None] = [trained_run(trial.config, records) for trial in trials]
    parent = _ParentRun(config, trials[0].config.tracking, folder)
    if searching:
        searched = searched_trials(config, _search(config, parent, folder, records))
        trials, runs = trials + searched, runs + [trained_run(trial.config, records) for trial in searched]
    trials = [dataclasses.replace(t, config=with_parent(t.config, parent.run_id)) for t in trials]
    pending = [trial for trial, run in zip(trials, runs) if run is None]
    if pending:
        concurrent = min(config.max_concurrent, len(pending))
        print(f"sweep {config.name}: {len(pending)} of {len(trials)} trials to train, {concurrent} at a time", flush=True)
        print(_estimate(pending, dataset, concurrent), flush=True)
        found = tuning.run_grid(config, trials, records.location, folder.location)
        runs = [found[trial.config.name] for trial in trials]
        failed = [trial.config.name for trial, run in zip(trials, runs) if isinstance(run, BaseException)]
        if failed:
            error = next(run for run in runs if isinstance(run, BaseException))
            parent.fail(error)
            raise RuntimeError(f"sweep {config.name}: {len(failed)} trial(s) failed ({', '.join(failed)}); the "
                               f"others are saved, and a rerun trains only what is missing") from error

    for trial, run in zip(trials, runs):
        assert isinstance(run, dict)
        run |= {"point": trial.point, "seed": trial.seed, "name": trial.config.name}
    bf16 = [run["name"] for run in runs if trained_in_bf16(run)]
    if 0 < len(bf16) < len(runs):
        warnings.warn(f"sweep {config.name}: trained in bf16 and fp32: bf16 in {', '.join(bf16)}, fp32 in the other "
                      f"{len(runs) - len(bf16)} trials (a record trained on another machine?); compare points within "
                      f"one precision, or delete those records to train them again here", RuntimeWarning, stacklevel=2)
    predictions, seeds = scored_predictions(config, zip(trials, runs), dataset)
    table = compare_models(predictions, config.reference or trials[0].point, k=config.subsets, seeds=seeds)
    table |= {"sweep": config.name, "split": config.split, "dataset": dataset.location,
              "parent_run_id": parent.run_id, "runs": runs, "bf16_trials": bf16,
              "development": development_ranking(zip(trials, runs))}
    folder.write_json("table.json", table)
    parent.finish(table)
    return SweepResult(table, [r for r in runs if isinstance(r, dict)], folder.uri("table.json"))


def check_search(config: SweepConfig) -> None:
    """Every end of every range in the search space as a trial's config: a key training does not
    have, or a value it refuses, fails here, before Ray starts; so do ASHA's first rung at or after
    a trial's last epoch."""
    search = config.search
    for corner in search.corners():
        trial = trial_config(config, corner, search.seed, "check", f"search.space {corner}")
        require(search.scheduler != "asha" or search.grace_epochs < trial.epochs, "search.grace_epochs",
                f"{search.grace_epochs} must be fewer than the trials' epochs ({trial.epochs}, at {corner}): "
                "ASHA could end a trial only once it had trained them all")


def with_parent(config: TrainConfig, parent_run_id: str | None) -> TrainConfig:
    return dataclasses.replace(config, tracking=dataclasses.replace(config.tracking, parent_run_id=parent_run_id))


def search_file(config: SweepConfig) -> str:
    """The search's record, beside the trials' records: every setting tried and its development loss."""
    return f"{config.trial_prefix or config.name}-search.json"


def search_trial_config(config: SweepConfig, parent_run_id: str | None, params: dict, trial_id: str) -> TrainConfig:
    """A search trial's training config: the sweep's, the sampled settings, no test split scored."""
    name = f"{config.trial_prefix or config.name}-search-{trial_id}"
    settings = {key: params[key] for key in config.search.space}
    train = trial_config(config, settings, config.search.seed, name, f"search trial {trial_id}", ["data.test_splits=[]"])
    return with_parent(pin_local_paths(train), parent_run_id)


def _search(config: SweepConfig, parent: _ParentRun, folder: OutputFolder, records: OutputFolder) -> dict:
    """Run the search (or take its record: a search done once, here or on another machine, is not
    run again) and return the chosen settings; its record (every setting tried, best first) goes to
    the sweep's parent run as `search.json`. A search cut short on another machine goes on from the
    trials its record keeps (`tuning.SearchProgress`)."""
    from functools import partial

    from cluster_train.experiments import tuning

    file = search_file(config)
    record = search_record(config)
    if is_complete(record):
        chosen = record["trials"][0]
    else:
        example = search_example(config, parent.run_id)
        make_config = partial(search_trial_config, _located(config, example), parent.run_id)
        done = record["trials"] if record else []  # a search cut short goes on from them
        print(f"sweep {config.name}: searching {', '.join(config.search.space)} over {config.search.samples} "
              f"trials ({config.search.algorithm}, scheduler {config.search.scheduler})"
              + (f", {len(done)} of them tried before" if done else ""), flush=True)
        print(estimate_trials(_search_trials(config, example, len(done)), config.max_concurrent), flush=True)
        progress = tuning.SearchProgress(records.location, file, to_flat_dict(config.search), list(config.search.space), done)
        tried = tuning.run_search(config, make_config, example, folder.location, done, progress)
        record = progress.finish(tried)
        folder.write_json("search.json", record)
        chosen = tried[0]
    parent.tracker.log_dict(record, "search.json")
    print(f"sweep {config.name}: chosen {chosen['settings']} (development loss {chosen[tuning.SEARCH_METRIC]:.4f}); "
          f"retrained over seeds {config.seeds} as point {config.search.point}", flush=True)
    return chosen["settings"]


def search_example(config: SweepConfig, parent_run_id: str | None = None) -> TrainConfig:
    """A search trial's config at the ends of every range: what sizes the search's trials."""
    ends = {key: corner[key] for corner in config.search.corners() for key in corner}
    return search_trial_config(config, parent_run_id, ends, "check")


def search_trials_left(config: SweepConfig) -> list[Trial]:
    """The search's trials not finished yet, each as its example config at all its epochs (what the
    estimate counts: an upper bound, as ASHA ends poor trials sooner); none once the search ended."""
    record = search_record(config)
    if config.search is None or is_complete(record):
        return []
    return _search_trials(config, search_example(config), len(record["trials"]) if record else 0)


def _search_trials(config: SweepConfig, example: TrainConfig, finished: int) -> list[Trial]:
    return [Trial("search", config.search.seed, example)] * max(0, config.search.samples - finished)


def _located(config: SweepConfig, example: TrainConfig) -> SweepConfig:
    """The sweep with its training config file and its trials' local paths (data, checkpoints, the
    MLflow store) made absolute here, on the driver: a search trial builds its config in Tune's trial
    folder, where a relative path names nothing."""
    pinned = [f"data.dataset={example.data.dataset}", f"storage_path={example.storage_path}",
              f"tracking.tracking_uri={example.tracking.tracking_uri}"]
    return dataclasses.replace(config, train_config=str(Path(config.train_config).resolve()),
                               overrides=[*config.overrides, *pinned])


def recorded_search(config: SweepConfig) -> dict | None:
    """The record of the sweep's search (every setting tried, best first); None before it ended, or
    when the search section changed since."""
    record = search_record(config)
    return record if is_complete(record) else None


def search_record(config: SweepConfig) -> dict | None:
    """The record of this search section: ended (`is_complete`) or cut short (the trials it
    finished); None where there is none."""
    if config.search is None:
        return None
    records, file = records_folder(config), search_file(config)
    record = records.read_json(file) if records.exists(file) else None
    return record if record is not None and record["search"] == to_flat_dict(config.search) else None


def is_complete(record: dict | None) -> bool:
    """Whether a search record is of a search that ended (one written before records said so did)."""
    return record is not None and bool(record.get("complete", True))


def planned_with_search(config: SweepConfig) -> list[Trial]:
    """`plan_trials`, and the searched point's trials once the search has chosen."""
    record = recorded_search(config)
    return plan_trials(config) + (searched_trials(config, record["trials"][0]["settings"]) if record else [])


def searched_trials(config: SweepConfig, settings: dict[str, Any]) -> list[Trial]:
    """The chosen settings as a point of the table, over the sweep's seeds."""
    point = config.search.point
    return [Trial(point, seed, pin_local_paths(trial_config(config, settings, seed, f"{config.trial_prefix or config.name}"
                                                            f"-{point}-seed{seed}", f"point {point} seed {seed}")))
            for seed in config.seeds]


def estimate_sweep(config: SweepConfig, pending: list[Trial]) -> str:
    """The estimate `run_sweep` prints, for the search's trials left and `pending` (the trials not
    trained yet, `trained_before`), without training."""
    return estimate_trials(search_trials_left(config) + pending, config.max_concurrent)


def trained_before(config: SweepConfig, trial: Trial) -> dict | None:
    """The trial's run where it has a record (or a finished run here), else None."""
    return trained_run(pin_local_paths(trial.config), records_folder(config))


def estimate_trials(pending: list[Trial], max_concurrent: int) -> str:
    """How long `pending` should take, `max_concurrent` at a time; what it needs where it cannot say."""
    from data_prep.dataset import PreparedDataset

    if not pending:
        return "every trial is trained"
    location = pending[0].config.data.dataset
    if not OutputFolder(location).exists("dataset.json"):
        return f"estimate: none before the dataset is prepared ({location} has no dataset.json; jobs/prep.py writes it)"
    return _estimate(pending, PreparedDataset(location), min(max_concurrent, len(pending)))


def _estimate(pending: list[Trial], dataset, concurrent: int) -> str:
    from cluster_train.experiments.estimate import busy_warning, format_estimate, time_steps_side_by_side
    from cluster_train.train.launch import with_dataset_shape

    if any(trial.config.scaling.use_gpu for trial in pending):
        return "estimate: none for GPU trials (steps timed on this machine's CPU would not predict them)"
    pending = [dataclasses.replace(t, config=with_dataset_shape(t.config, dataset)) for t in pending]
    copies = concurrent if all(t.config.scaling.num_workers == 0 for t in pending) else 1  # trials side by side here
    load = os.getloadavg()[0]  # before this process's own timing adds to it
    costs = {}
    for trial in pending:
        if trial.config.model_kind not in costs:
            costs[trial.config.model_kind] = time_steps_side_by_side(trial.config, copies)
    busy = busy_warning(load, os.cpu_count() or 1)
    return format_estimate(pending, costs, concurrent, dataset) + (f"\n{busy}" if busy else "")


class _ParentRun:
    """The sweep's MLflow run, parent of its trials' runs: created once, its id kept in the sweep's
    folder (`PARENT_FILE`) so a rerun re-opens it; it holds the table when the sweep ends."""

    def __init__(self, config: SweepConfig, tracking, folder: OutputFolder):
        from cluster_train.tracking import RunTracker

        self.tracker = RunTracker(dataclasses.replace(tracking, run_name=config.name, parent_run_id=None))
        saved = folder.read_json(PARENT_FILE)["run_id"] if folder.exists(PARENT_FILE) else None
        params = {key: json.dumps(value) for key, value in to_flat_dict(config).items()}
        self.run_id = self.tracker.start(params, {"sweep": config.name}, run_id=saved)
        if self.run_id is not None and self.run_id != saved:
            folder.write_json(PARENT_FILE, {"run_id": self.run_id})

    def finish(self, table: dict) -> None:
        self.tracker.log_dict(table, "table.json")
        self.tracker.end()

    def fail(self, error: BaseException) -> None:
        self.tracker.fail(error)
