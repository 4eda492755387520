"""A sweep's trials as Ray Tune trials: the fixed grid x seeds, and the search.

    runs = run_grid(sweep, trials, records, folder)   # trial name -> its run (a dict) or the error it raised
    tried = run_search(sweep, make_config, example, folder)   # every setting tried, best development loss first

Each Tune trial is the ordinary training job (`launch.run_training`): a trial with
`scaling.num_workers=0` trains in its Tune trial's process on the CPUs it reserves; one with workers
starts a Ray Train run from its trial, whose workers ask the cluster for their own CPUs and GPUs (the
autoscaler adds them) while the trial itself reserves a hundredth of a CPU. Tune schedules the trials across the
cluster, `max_concurrent` at once, prints its status table, and keeps the experiment's state under
`<output>/<sweep>/tune/`: a sweep whose driver died is run again with `Tuner.restore`, and a trial cut
short goes on from its own last checkpoint (its run folder is named after it). Every epoch reaches
Tune (`tune_epoch_reporter`, `TuneReportCallback`), so the search's scheduler (ASHA) can end poor
trials early; a line per finished trial says how many are done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ray import tune

from cluster_train.experiments.records import train_trial, trained_run
from cluster_train.train.config import TrainConfig
from data_prep.storage import OutputFolder, open_filesystem

if TYPE_CHECKING:
    from cluster_train.experiments.sweep import SweepConfig, Trial

SEARCH_METRIC, SEARCH_MODE = "dev/best_loss", "min"  # sum over attributes of 1 - CCC, at the best epoch so far
DONE = "trial/done"  # in a trial's last result only: it trained to the end and was scored
REUSED = "trial/reused"  # a grid trial's result: it had a record, nothing trained
DRIVER_CPU = 0.01  # a Ray Train trial's own share: Tune refuses none, its workers reserve the rest


def trial_resources(config: TrainConfig) -> dict[str, float]:
    """What a Tune trial reserves: a one-process trial its CPUs (and a GPU), a Ray Train trial
    next to nothing, as its workers reserve theirs."""
    if config.scaling.num_workers == 0:
        return {"cpu": config.scaling.cpus_per_worker, "gpu": 1.0 if config.scaling.use_gpu else 0.0}
    return {"cpu": DRIVER_CPU}


def _result(run: dict) -> dict[str, Any]:
    """A finished trial's last Tune result: its best development loss and its scores, flat; its
    seconds those of every epoch it trained (a run's own `seconds` count its last sitting only)."""
    epochs = run.get("curves", {}).get("time/epoch", [])
    seconds = float(sum(epochs)) if epochs else float(run.get("seconds", 0.0))
    result = {DONE: 1.0, "seconds": seconds, "epochs_run": float(run.get("epochs_run", 0))}
    result |= {k: v for k, v in run.get("last_epoch", {}).items() if k.startswith("dev/") and isinstance(v, (int, float))}
    for split, values in run.get("scores", {}).items():
        result |= {f"{split}/ccc_{a}": v for a, v in values.items() if isinstance(v, float)}
    return result


def _grid_trial(params: dict, configs: dict[str, TrainConfig], records: str) -> None:
    """One trial of the grid, by name: trained (or found trained) and recorded."""
    config = configs[params["trial"]]
    found = trained_run(config, OutputFolder(records))
    run = found or train_trial(config, records)
    tune.report(_result(run) | {REUSED: float(found is not None)})


def grid_resources(configs: dict[str, TrainConfig]) -> Callable[[dict], tune.PlacementGroupFactory]:
    """What each grid trial reserves, by its own config (`trial_resources`): a grid may mix
    one-process trials with Ray Train trials, or CPU points with GPU points."""
    return lambda params: _placement(configs[params["trial"]])


def search_resources(make_config: Callable[[dict, str], TrainConfig], example: TrainConfig, keys: list[str]):
    """What each search trial reserves: where the space varies `scaling.*` (threads, workers, a
    GPU), what the config its sampled settings make needs; else what every trial needs, the
    example's (built once: a config a trial cannot build fails in that trial, where Tune reports it)."""
    if not any(key.startswith("scaling.") for key in keys):
        return _placement(example)
    return lambda params: _placement(make_config(params, "sizing"))


def _placement(config: TrainConfig) -> tune.PlacementGroupFactory:
    return tune.PlacementGroupFactory([{k.upper(): v for k, v in trial_resources(config).items()}])


def _named(trial) -> str:
    """A grid trial's Tune name and folder: the trial's own name."""
    return trial.config["trial"]


def _experiment(folder: str, kind: str, identity: object) -> tuple[str, str]:
    """(storage path, experiment name) of a sweep's Tune experiment: named after what it runs, so a
    changed plan starts a new experiment instead of restoring one that runs other trials."""
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:10]
    storage = f"{folder.rstrip('/')}/tune"
    return (storage if "://" in storage else str(Path(storage).resolve())), f"{kind}-{digest}"


def _tuner(trainable, param_space: dict, tune_config, storage: str, name: str, callbacks: list, retries: int):
    """A new Tuner, or the one restored from `storage/name` when that experiment exists (its
    driver died): finished trials are kept, unfinished and errored ones start again."""
    filesystem, root = open_filesystem(storage)
    if _can_restore(storage, name):
        print(f"tune: restoring experiment {storage}/{name}", flush=True)
        return tune.Tuner.restore(f"{root}/{name}", trainable, resume_errored=True, storage_filesystem=filesystem)
    # verbose 1: Tune's status table, not every result; TrialLines says when each trial ends
    run_config = tune.RunConfig(name=name, storage_path=root, storage_filesystem=filesystem, callbacks=callbacks,
                                failure_config=tune.FailureConfig(max_failures=retries), verbose=1)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config, run_config=run_config)


def _can_restore(storage: str, name: str) -> bool:
    filesystem, root = open_filesystem(storage)
    return tune.Tuner.can_restore(f"{root}/{name}", storage_filesystem=filesystem)


def tracking_uri(config: TrainConfig) -> str | None:
    return config.tracking.resolved_uri() if config.tracking.enabled else None


def _start_ray() -> None:
    import ray

    from cluster_train.console import ray_env

    if not ray.is_initialized():
        ray.init(logging_level="WARNING", runtime_env={"env_vars": ray_env(False)})


def run_grid(sweep: SweepConfig, trials: list[Trial], records: str, folder: str) -> dict[str, dict | BaseException]:
    """Every trial of the plan as a Tune grid over trial names (trials with a record finish at once);
    trial name -> its run, or the error that ended it."""
    _start_ray()
    configs = {trial.config.name: trial.config for trial in trials}
    trainable = tune.with_resources(tune.with_parameters(_grid_trial, configs=configs, records=records),
                                    grid_resources(configs))
    storage, name = _experiment(folder, "grid", sorted(configs))
    tuner = _tuner(trainable, {"trial": tune.grid_search(list(configs))},
                   tune.TuneConfig(max_concurrent_trials=sweep.max_concurrent, trial_name_creator=_named,
                                   trial_dirname_creator=_named), storage, name,
                   [TrialLines(len(configs), tracking_uri(trials[0].config))], sweep.trial_retries)
    grid = tuner.fit()
    found: dict[str, dict | BaseException] = {}
    for result in grid:
        trial = result.config["trial"]
        run = trained_run(configs[trial], OutputFolder(records)) if result.error is None else None
        if run is not None:
            run["reused"] = bool(result.metrics.get(REUSED))
        found[trial] = run if run is not None else (result.error or RuntimeError(f"trial {trial} left no record"))
    return found


def search_space(sweep: SweepConfig) -> dict[str, Any]:
    """The search section's space as Tune domains."""
    domains = {"choice": tune.choice, "uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    space = {}
    for key, spec in sweep.search.space.items():
        [(kind, values)] = spec.items()
        space[key] = domains[kind](values) if kind == "choice" else domains[kind](*values)
    return space


def _search_trial(params: dict, make_config: Callable[[dict, str], TrainConfig]) -> None:
    """One point of the search: trained on development only (no test split is scored)."""
    from cluster_train.train.launch import run_training

    config = make_config(params, tune.get_context().get_trial_id())
    result = run_training(config)
    tune.report(_result({"seconds": result.seconds, "epochs_run": result.epochs_run,
                         "last_epoch": result.metrics, "scores": result.scores}))


def run_search(sweep: SweepConfig, make_config: Callable[[dict, str], TrainConfig], example: TrainConfig,
               folder: str, done: list[dict], progress: SearchProgress) -> list[dict]:
    """Sample `search.samples` settings with the search algorithm, end poor trials early with the
    scheduler; one dict per trial (its settings, best development loss, epochs, whether it was
    stopped early), best first. Each finished trial is kept in `progress`'s record at once.

    `done`: the trials a search cut short finished (its record's, from another machine): where its
    Tune experiment is not here to restore, the algorithm is told their results and only the rest
    are sampled. The scheduler compares the new trials with each other only."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    search = sweep.search
    _start_ray()
    storage, name = _experiment(folder, "search", dataclasses.asdict(search))
    warm = [] if _can_restore(storage, name) else done
    if len(warm) >= search.samples:  # cut after its last trial, before its record was complete
        return progress.record(warm, complete=True)["trials"]
    if search.algorithm == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        known = [t for t in warm if math.isfinite(t[SEARCH_METRIC])]
        told = {"points_to_evaluate": [t["settings"] for t in known],
                "evaluated_rewards": [t[SEARCH_METRIC] for t in known]} if known else {}
        algorithm = OptunaSearch(sampler=TPESampler(seed=search.seed, n_startup_trials=search.startup_samples), **told)
    else:  # another random state after a cut: the same one would sample the finished settings again
        algorithm = BasicVariantGenerator(random_state=search.seed + len(warm))
    # Rungs up to the last epoch but one: a trial ended at its last epoch would have trained every
    # epoch and still be unscored. Not stop_last_trials: past the last rung nothing is cut short,
    # neither the last epoch nor the report after final scoring.
    scheduler = ASHAScheduler(time_attr="training_iteration", max_t=example.epochs - 1, grace_period=search.grace_epochs,
                              reduction_factor=search.reduction_factor,
                              stop_last_trials=False) if search.scheduler == "asha" else None
    trainable = tune.with_resources(tune.with_parameters(_search_trial, make_config=make_config),
                                    search_resources(make_config, example, list(search.space)))
    tune_config = tune.TuneConfig(metric=SEARCH_METRIC, mode=SEARCH_MODE, search_alg=algorithm, scheduler=scheduler,
                                  num_samples=search.samples - len(warm), max_concurrent_trials=sweep.max_concurrent)
    lines = TrialLines(search.samples, tracking_uri(example), already=len(warm), progress=progress)
    grid = _tuner(trainable, search_space(sweep), tune_config, storage, name, [lines], sweep.trial_retries).fit()
    found = {}
    for result in grid:
        if result.error is None and result.metrics:
            losses = result.metrics_dataframe[SEARCH_METRIC].dropna() if result.metrics_dataframe is not None else []
            entry = _search_entry(list(search.space), result.config, result.metrics, min(losses) if len(losses) else None)
            found[entry["trial_id"]] = entry
    found = {t["trial_id"]: t for t in done} | found
    if not found:
        error = next((result.error for result in grid if result.error is not None), None)
        cause = f"; the first trial's error: {str(error).strip().splitlines()[-1]}" if error is not None else ""
        raise RuntimeError(f"sweep {sweep.name}: no search trial finished an epoch (see {storage}/{name}){cause}") from error
    return progress.record(list(found.values()), complete=True)["trials"]


def _search_entry(keys: list[str], config: dict, metrics: dict, best_loss: float | None) -> dict:
    """A finished search trial as its record keeps it."""
    return {"settings": {k: config[k] for k in keys}, "trial_id": metrics.get("trial_id"),
            SEARCH_METRIC: float(best_loss if best_loss is not None else metrics.get(SEARCH_METRIC, float("inf"))),
            "epochs": int(metrics.get("training_iteration", 0)) - (1 if metrics.get(DONE) else 0),
            "stopped_early": not metrics.get(DONE)}


class SearchProgress:
    """The search's record in the records folder while it runs: every finished trial added as it
    ends (`complete: false`), so a search cut short on one machine goes on from there on another."""

    def __init__(self, records: str, file: str, search: dict, keys: list[str], done: list[dict]):
        self.records, self.file, self.search, self.keys = records, file, search, keys  # keys: the space's
        self.kept = {trial["trial_id"]: trial for trial in done}  # done: the record's trials when this run began

    def record(self, trials: list[dict], complete: bool) -> dict:
        return {"search": self.search, "metric": SEARCH_METRIC, "complete": complete,
                "trials": sorted(trials, key=lambda trial: trial[SEARCH_METRIC])}

    def add(self, entry: dict) -> None:
        self.kept[entry["trial_id"]] = entry
        self._write(list(self.kept.values()), complete=False)

    def finish(self, trials: list[dict]) -> dict:
        """The search's whole record, written complete."""
        return self._write(trials, complete=True)

    def _write(self, trials: list[dict], complete: bool) -> dict:
        record = self.record(trials, complete)
        folder = OutputFolder(self.records)
        folder.make()
        folder.write_json(self.file, record)
        return record


class TrialLines(tune.Callback):
    """One line per finished trial: `trial 3 of 8 done: <name>  dev CCC A .612 D .433 V .120  41 min
    (stopped early after 2 epochs)`; its MLflow run, when the scheduler stopped it, marked KILLED."""

    def __init__(self, total: int, tracking_uri: str | None, already: int = 0, progress: SearchProgress | None = None):
        self.total, self.done, self.tracking_uri, self.progress = total, already, tracking_uri, progress

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self.done += 1
        result = trial.last_result or {}
        if self.progress is not None and result.get(SEARCH_METRIC) is not None:
            best = trial.metric_analysis.get(SEARCH_METRIC, {}).get("min")
            try:
                self.progress.add(_search_entry(self.progress.keys, trial.config, result, best))
            except OSError as error:  # the search goes on; its end writes the whole record again
                warnings.warn(f"search record {self.progress.file}: trial {trial.trial_id} not kept ({error}); a "
                              f"search cut short now goes on from the trials kept before", RuntimeWarning, stacklevel=2)
        name = trial.config.get("trial") or trial.trial_id
        ccc = " ".join(f"{a[0].upper()} {result[f'dev/ccc_{a}']:.3f}" for a in ("arousal", "dominance", "valence")
                       if f"dev/ccc_{a}" in result)
        minutes = result.get("seconds", result.get("time_total_s", 0)) / 60  # Tune's counts since a restore
        stopped = "" if result.get(DONE) else f"  (stopped early after {result.get('training_iteration', 0)} epoch(s))"
        stopped += "  (recorded before)" if result.get(REUSED) else ""
        print(f"trial {self.done} of {self.total} done: {name}  dev CCC {ccc}  {minutes:.0f} min{stopped}", flush=True)
        if not result.get(DONE) and result.get("mlflow_run_id") and self.tracking_uri:
            _mark_killed(result["mlflow_run_id"], self.tracking_uri)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self.done += 1
        print(f"trial {self.done} of {self.total} failed: {trial.config.get('trial') or trial.trial_id} "
              f"(its error: {trial.path})", flush=True)


def _mark_killed(run_id: str, tracking_uri: str) -> None:
    """The MLflow run of a trial the scheduler ended: KILLED, not left RUNNING."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "KILLED")
    except Exception:  # noqa: BLE001 - the status is cosmetic; the trial's result stands
        pass
