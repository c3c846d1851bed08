"""Where trials run: on Ray Tune (a local Ray by default, or a Ray cluster), or inline in this process.

Three shapes of work, each given to an existing engine rather than to a scheduler of our own:

* **Optuna samplers** (cma, tpe, random, grid): Ray Tune runs the trials, its ``OptunaSearch``
  asks the Optuna study for each configuration and tells it the result, a ``ConcurrencyLimiter``
  keeps ``workers`` trials in flight; inline, Optuna's own ``study.optimize`` loop. The study lives
  in ``OUT/optuna.journal`` (Optuna's append-only journal storage), so a resumed search continues
  the sampler's state (CMA-ES's distribution included).
* **a batch of fixed points** (MAP's samples): one Tune run over the points (``grid_search`` over
  them), ``workers`` at a time.
* **a sequential algorithm** that keeps a population or an iterate resident (Evolver,
  Frank–Wolfe): one Tune trial that reports every evaluation as it happens (so a cluster places it
  on a node with ``--gpus-per-trial``), or a plain call inline.

Every trial runs in a :class:`~mergelab.search.worker.TrialWorker` that Ray Tune's reused actors
(``reuse_actors=True``) keep between trials, so the inputs are read once per worker. Each finished
trial comes back to the driver as a JSON record, which the driver appends to the trial log.

A local Ray binds every service to the loopback address (as ``mergelab merge --executor ray``
does) and is shut down at the end; ``address`` connects to a running cluster instead, whose nodes
need mergelab installed and, for ``zoo:``/``lm:`` objectives and recipe paths, the same files.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Any, cast

from mergelab.errors import MergelabError, OptionError
from mergelab.search.genome import Assignment
from mergelab.search.worker import WorkerSpec, error_record, get_worker

Emit = Callable[[dict[str, Any]], dict[str, Any]]

SEQUENTIAL: dict[str, str] = {
    "evolver": "mergelab.search.evolver:run_in_worker",
    "fw": "mergelab.search.fw:run_in_worker",
}


class TrialFailed(MergelabError):
    """A trial raised; the search stops with the trial's one-line message (its exit code)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _sequential(name: str) -> Callable[..., Any]:
    module, _, fn = SEQUENTIAL[name].partition(":")
    return getattr(importlib.import_module(module), fn)


def import_optuna() -> Any:
    try:
        import optuna
    except ImportError as exc:
        raise OptionError("mergelab search needs Optuna: pip install 'mergelab[search]'") from exc
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def journal_storage(folder: Path) -> Any:
    """The Optuna study's storage: ``folder/optuna.journal`` (append-only, survives a kill)."""
    import_optuna()
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    return JournalStorage(JournalFileBackend(str(folder / "optuna.journal")))


def fail_stale_trials(study: Any) -> int:
    """Mark trials a killed run left RUNNING as failed (the samplers ignore them); how many."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for t in stale:
        with suppress(Exception):
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    return len(stale)


def _result(record: Mapping[str, Any], n_objectives: int) -> dict[str, Any]:
    """What a trial reports to Ray Tune: the objective(s) and the record as JSON."""
    out: dict[str, Any] = {"record": json.dumps(record, default=str)}
    if "error" in record:
        return out
    out["score"] = float(record["score"])
    tasks = list(record["scores"]["tasks"].values())
    for i in range(n_objectives):
        out[f"obj_{i}"] = float(tasks[i]) if i < len(tasks) else math.nan
    return out


# ----------------------------------------------------------------------------------------- inline


class InlineBackend:
    """Trials in this process, one at a time (no Ray): for tests, small searches, notebooks."""

    name = "inline"

    def __init__(self, spec: WorkerSpec, emit: Emit, folder: Path) -> None:
        self.spec = spec
        self.emit = emit
        self.folder = folder

    def optuna(
        self,
        sampler: Any,
        distributions: Mapping[str, Any],
        n_trials: int,
        directions: Sequence[str],
        enqueue: Sequence[Mapping[str, float]] = (),
    ) -> None:
        optuna = import_optuna()
        study = optuna.create_study(
            storage=journal_storage(self.folder),
            sampler=sampler,
            study_name="mergelab",
            directions=list(directions),
            load_if_exists=True,
        )
        fail_stale_trials(study)
        for point in enqueue:
            study.enqueue_trial(dict(point))
        worker = get_worker(self.spec)
        assert worker.genome is not None
        multi = len(directions) > 1

        def objective(trial: Any) -> Any:
            config = {name: trial.suggest_float(name, d.low, d.high, log=d.log) for name, d in distributions.items()}
            record = worker.evaluate_vector(worker.genome.vector(config))  # type: ignore[union-attr]
            self.emit(record)
            if multi:
                return tuple(record["scores"]["tasks"].values())[: len(directions)]
            return record["score"]

        if n_trials > 0:
            study.optimize(objective, n_trials=n_trials, catch=())

    def batch(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        worker = get_worker(self.spec)
        out = []
        for item in items:
            record = worker.evaluate(Assignment.from_dict(item["assignment"]))
            record.update({k: v for k, v in item.items() if k != "assignment"})
            out.append(self.emit(record))
        return out

    def sequential(self, name: str, payload: Mapping[str, Any]) -> None:
        worker = get_worker(self.spec)
        _sequential(name)(worker, dict(payload), self.emit)

    def close(self) -> None:
        return None


# ----------------------------------------------------------------------------------------- Ray Tune


def import_ray(local: bool) -> Any:
    if local:  # loopback only, workers at the caller's priority (see mergelab.executors.ray)
        from mergelab.executors.ray import LOCAL_RAY_ENV

        for k, v in LOCAL_RAY_ENV.items():
            os.environ.setdefault(k, v)
    # Tune: trials report a record, not always the metric (a failed trial); no TensorBoard nag
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        import ray
        from ray import tune  # noqa: F401 - Ray Tune must be importable
    except ImportError as exc:
        raise OptionError("mergelab search runs trials on Ray Tune: pip install 'mergelab[search]'") from exc
    return ray


def _tune_report(metrics: Mapping[str, Any]) -> None:
    from ray import tune

    tune.report(dict(metrics))


def _optuna_trial(config: Mapping[str, Any], spec: WorkerSpec, n_objectives: int) -> None:
    """A Tune trial of an Optuna-sampled configuration."""
    try:
        worker = get_worker(spec)
        assert worker.genome is not None
        record = worker.evaluate_vector(worker.genome.vector(config))
    except Exception as exc:  # reported to the driver, which stops the search with this message
        record = {**error_record(exc), "config": dict(config), "exit_code": getattr(exc, "exit_code", 1)}
    _tune_report(_result(record, n_objectives))


def _batch_trial(config: Mapping[str, Any], spec: WorkerSpec) -> None:
    """A Tune trial of one fixed point (MAP's samples)."""
    item = config["item"]
    try:
        record = get_worker(spec).evaluate(Assignment.from_dict(item["assignment"]))
        record.update({k: v for k, v in item.items() if k != "assignment"})
    except Exception as exc:
        record = {**error_record(exc), "key": item.get("key"), "exit_code": getattr(exc, "exit_code", 1)}
    _tune_report(_result(record, 0))


def _sequential_trial(config: Mapping[str, Any], spec: WorkerSpec, name: str) -> None:
    """One Tune trial running a sequential algorithm, reporting each evaluation."""
    try:
        worker = get_worker(spec)

        def report(record: dict[str, Any]) -> dict[str, Any]:
            _tune_report(_result(record, 0))
            return record

        _sequential(name)(worker, dict(config["payload"]), report)
    except Exception as exc:
        _tune_report(_result({**error_record(exc), "exit_code": getattr(exc, "exit_code", 1)}, 0))


class RayBackend:
    """Trials on Ray Tune (see the module docstring)."""

    name = "ray"

    def __init__(
        self,
        spec: WorkerSpec,
        emit: Emit,
        folder: Path,
        *,
        address: str | None = None,
        workers: int = 1,
        cpus_per_trial: float = 1.0,
        gpus_per_trial: float = 0.0,
    ) -> None:
        if workers < 1:
            raise OptionError(f"--workers must be at least 1, got {workers}")
        if cpus_per_trial <= 0 or gpus_per_trial < 0:
            raise OptionError("--cpus-per-trial must be > 0 and --gpus-per-trial >= 0")
        self.spec = spec
        self.emit = emit
        self.folder = folder
        self.address = address
        self.workers = workers
        self.resources = {"cpu": cpus_per_trial, **({"gpu": gpus_per_trial} if gpus_per_trial else {})}
        self.ray = import_ray(local=address is None)
        self.started = False
        if not self.ray.is_initialized():
            kwargs: dict[str, Any] = {
                "include_dashboard": False,
                "log_to_driver": False,
                "logging_level": logging.ERROR,
            }
            if address is None:
                kwargs["num_cpus"] = max(1, math.ceil(workers * cpus_per_trial))
                if gpus_per_trial:
                    kwargs["num_gpus"] = max(1, math.ceil(workers * gpus_per_trial))
            try:
                self.ray.init(address=address, **kwargs)
            except Exception as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray"
                raise OptionError(f"cannot start or reach {where} ({type(exc).__name__}: {exc})") from exc
            self.started = True
        self._storage = Path(tempfile.mkdtemp(prefix=".tune-", dir=folder)).resolve()
        logging.getLogger("ray.tune").setLevel(logging.ERROR)
        logging.getLogger("ray.train").setLevel(logging.ERROR)

    # -- Tune plumbing
    def _fit(self, trainable: Any, *, tune_config: Any, param_space: Mapping[str, Any] | None, sink: Any) -> None:
        import uuid

        from ray import tune

        from mergelab.search import _tune

        token = uuid.uuid4().hex
        _tune.open_run(token, sink)
        try:
            run_config = tune.RunConfig(
                name="search",
                storage_path=str(self._storage),
                callbacks=[_tune.LogResults(token)],
                stop=_tune.StopOnError(token),
                verbose=0,
                log_to_file=False,
            )
            tuner = tune.Tuner(
                tune.with_resources(trainable, self.resources),
                tune_config=tune_config,
                run_config=run_config,
                param_space=dict(param_space) if param_space is not None else None,
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grid = tuner.fit()
        finally:
            err = _tune.close_run(token)
        if err is not None:
            raise TrialFailed(f"a trial failed: {err['error']}", int(err.get("exit_code") or 1))
        for error in grid.errors:
            first = (str(error).strip().splitlines() or ["?"])[-1][:300]
            raise TrialFailed(f"a trial failed on Ray: {first}")

    # -- the three shapes of work
    def optuna(
        self,
        sampler: Any,
        distributions: Mapping[str, Any],
        n_trials: int,
        directions: Sequence[str],
        enqueue: Sequence[Mapping[str, float]] = (),
    ) -> None:
        import_optuna()
        from ray import tune
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        if n_trials <= 0:
            return
        multi = len(directions) > 1
        metric: Any = [f"obj_{i}" for i in range(len(directions))] if multi else "score"
        mode: Any = ["max" if d == "maximize" else "min" for d in directions] if multi else "max"
        storage = journal_storage(self.folder)
        import optuna

        study = optuna.create_study(
            storage=storage,
            sampler=sampler,
            study_name="mergelab",
            directions=cast(Any, list(directions)),
            load_if_exists=True,
        )
        fail_stale_trials(study)
        optuna_search = OptunaSearch(
            space=dict(distributions),
            metric=metric,
            mode=mode,
            sampler=sampler,
            storage=storage,
            study_name="mergelab",
            points_to_evaluate=[dict(p) for p in enqueue] or None,
        )
        search = ConcurrencyLimiter(optuna_search, max_concurrent=self.workers)
        trainable = tune.with_parameters(_optuna_trial, spec=self.spec, n_objectives=len(directions) if multi else 0)
        self._fit(
            trainable,
            tune_config=tune.TuneConfig(search_alg=search, num_samples=n_trials, reuse_actors=True),
            param_space=None,
            sink=self.emit,
        )

    def batch(self, items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        from ray import tune

        if not items:
            return []
        got: dict[str, dict[str, Any]] = {}

        def sink(record: dict[str, Any]) -> None:
            got[record["key"]] = self.emit(record)

        trainable = tune.with_parameters(_batch_trial, spec=self.spec)
        self._fit(
            trainable,
            tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=self.workers, reuse_actors=True),
            param_space={"item": tune.grid_search([dict(i) for i in items])},
            sink=sink,
        )
        missing = [i["key"] for i in items if i["key"] not in got]
        if missing:
            raise TrialFailed(f"Ray Tune returned no result for trial {missing[0]}")
        return [got[i["key"]] for i in items]

    def sequential(self, name: str, payload: Mapping[str, Any]) -> None:
        from ray import tune

        trainable = tune.with_parameters(_sequential_trial, spec=self.spec, name=name)
        self._fit(
            trainable,
            tune_config=tune.TuneConfig(num_samples=1, reuse_actors=False),
            param_space={"payload": dict(payload)},
            sink=self.emit,
        )

    def close(self) -> None:
        shutil.rmtree(self._storage, ignore_errors=True)
        if self.started:
            self.ray.shutdown()
