"""``run_search``: validate everything, run the algorithm on its backend, write the outputs.

Order of work (everything that can fail cheaply fails before a tensor is read):

1. the recipe is loaded and planned from headers (its experts and layer count), the space file is
   validated against the method's own parameter models and turned into a genome, the algorithm's
   options are validated, and the objective is checked against the test-split guard;
2. the output folder's trial log is opened: a new search writes its header, a search with the same
   fingerprint resumes (its logged trials count toward the budget), another search is refused;
3. the algorithm runs on Ray Tune (or inline), every finished trial appended to the log;
4. ``trials.json``/``.csv``, ``best_recipe.yaml``, the plots and ``search.json`` are written.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from mergelab.errors import OptionError, OutputError, RecipeError
from mergelab.recipe import Recipe, load_recipe
from mergelab.search import map as map_alg
from mergelab.search.genome import Assignment, Genome, apply_assignment
from mergelab.search.log import LOG_NAME, TrialLog
from mergelab.search.objective import check_not_test, check_objective, split_spec
from mergelab.search.options import ALGORITHMS, OPTUNA_ALGORITHMS, MapOptions, algorithm_options
from mergelab.search.outputs import (
    non_dominated_records,
    plot_convergence,
    plot_pareto,
    write_atomic,
    write_json,
    write_trials,
)
from mergelab.search.space import SearchSpace, load_space, validate_space
from mergelab.search.worker import WorkerSpec

OUTPUT_FILES = (
    LOG_NAME,
    "trials.json",
    "trials.csv",
    "best_recipe.yaml",
    "convergence.png",
    "pareto.png",
    "pareto.json",
    "map.json",
    "search.json",
    "optuna.journal",
    "optuna.journal.lock",
)
OUTPUT_DIRS = ("evolver", "fw")


class SearchProgress(Protocol):
    """What the command line shows: trials done of the budget, the best score, an ETA."""

    def start(self, total: int, done: int) -> None: ...

    def trial(self, done: int, total: int, best: float | None, last: Mapping[str, Any]) -> None: ...

    def note(self, message: str) -> None: ...

    def end(self) -> None: ...


class _Quiet:
    def start(self, total: int, done: int) -> None:
        return None

    def trial(self, done: int, total: int, best: float | None, last: Mapping[str, Any]) -> None:
        return None

    def note(self, message: str) -> None:
        warnings.warn(message, stacklevel=3)

    def end(self) -> None:
        return None


@dataclass
class SearchResult:
    """A finished search: its folder, the best trial, every trial and the summary (``search.json``)."""

    out: Path
    best: dict[str, Any] | None
    trials: list[dict[str, Any]]
    summary: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _recipe_dump(rec: Recipe) -> dict[str, Any]:
    """The recipe as a dict with local model paths absolute (workers may run elsewhere)."""

    def absolute(ref: str | None) -> str | None:
        if ref is None:
            return None
        p = Path(ref)
        return str(p.resolve()) if p.exists() else ref

    rec = rec.model_copy(
        update={
            "base_model": absolute(rec.base_model),
            "models": [m.model_copy(update={"model": absolute(m.model)}) for m in rec.models],
        }
    )
    return rec.model_dump(mode="json", by_alias=True, exclude_none=True)


def _reset(out: Path) -> None:
    """--force: remove a previous search's files (the trial log opens only folders holding a search)."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    for p in out.glob(".tune-*"):
        shutil.rmtree(p, ignore_errors=True)


class _Run:
    """One search in progress (driver side): the log, the budget, the progress display."""

    def __init__(self, log: TrialLog, budget: int, progress: SearchProgress, algorithm: str) -> None:
        self.log = log
        self.budget = budget
        self.progress = progress
        self.algorithm = algorithm
        self.notes: list[str] = []
        self.t0 = time.perf_counter()
        self.logged_before = len(log.trials)

    def best(self) -> float | None:
        scores = [float(r["score"]) for r in self.log.trials if r.get("score") is not None]
        return max(scores) if scores else None

    def emit(self, record: dict[str, Any]) -> dict[str, Any]:
        entry = {
            "algorithm": self.algorithm,
            **record,
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
            "time": round(time.time(), 3),
        }
        logged = self.log.append(entry)
        self.progress.trial(len(self.log.trials), self.budget, self.best(), logged)
        return logged

    def note(self, message: str) -> None:
        self.notes.append(message)
        self.progress.note(message)


def run_search(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe,
    *,
    objective: str,
    out: str | os.PathLike[str],
    space: str | os.PathLike[str] | Mapping[str, Any] | SearchSpace | None = None,
    algorithm: str = "cma",
    budget: int | None = None,
    objective_options: Mapping[str, str] | None = None,
    seed: int = 0,
    executor: str = "ray",
    address: str | None = None,
    workers: int = 1,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    device: str | None = None,
    threads: int | None = None,
    multi_objective: bool = False,
    preference: Sequence[float] | None = None,
    allow_test: bool = False,
    force: bool = False,
    progress: SearchProgress | None = None,
) -> SearchResult:
    """Search the recipe's parameters (see :mod:`mergelab.search`). ``executor``: ``ray`` (Ray Tune,
    a local Ray bound to loopback unless ``address``) or ``inline`` (this process, one trial at a
    time). ``budget``: trials (evaluations); default 200 for the Optuna samplers, the algorithm's
    own count for evolver, map and fw."""
    prog: SearchProgress = progress or _Quiet()
    if algorithm not in ALGORITHMS:
        raise OptionError(f"--algorithm {algorithm!r}: unknown; use one of {', '.join(ALGORITHMS)}")
    if executor not in ("ray", "inline"):
        raise OptionError(f"--executor {executor!r}: use ray or inline")
    if budget is not None and budget < 1:
        raise OptionError(f"--budget must be at least 1, got {budget}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise OptionError(f"--seed: expected a whole number, got {seed!r}")
    if workers < 1:
        raise OptionError(f"--workers must be at least 1, got {workers}")
    if cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise OptionError("--cpus-per-trial must be above 0 and --gpus-per-trial at least 0")
    opts_objective = dict(objective_options or {})
    rec = load_recipe(recipe)
    if rec.slices is not None:
        raise RecipeError("mergelab search varies a `models:` recipe; rewrite the slices as models with gradients")
    from mergelab.api import plan_merge
    from mergelab.methods import get_method
    from mergelab.plan import _split_inputs

    method = get_method(rec.merge_method)
    sp, where = load_space(space)
    validate_space(sp, method, where, rec.parameters)
    plan = plan_merge(rec)
    try:
        num_layers = plan.num_layers
        _, expert_idx = _split_inputs(rec, method)
        experts = [rec.models[i].model for i in expert_idx]
    finally:
        plan.close()
    genome = Genome(sp, experts, num_layers, where)
    options = algorithm_options(algorithm, sp.options_for(algorithm), where)
    if algorithm in OPTUNA_ALGORITHMS and len(genome) == 0:
        raise RecipeError(f"{where}: names no parameter to vary; add model_parameters: or parameters: with bounds")
    test_reason = check_not_test(objective, opts_objective, allow_test=allow_test)
    check_objective(objective, opts_objective)
    if multi_objective and algorithm in ("evolver", "fw"):
        raise OptionError(f"--multi-objective: {algorithm} optimises one score; use tpe, random, grid or map")
    default_budget = {"evolver": None, "map": None, "fw": None}.get(algorithm, 200)
    budget_ = budget if budget is not None else default_budget
    dump = _recipe_dump(rec)
    search_def = {
        "recipe": dump,
        "space": sp.model_dump(mode="json"),
        "objective": objective,
        "objective_options": opts_objective,
        "algorithm": algorithm,
        "options": options.model_dump(mode="json"),
        "seed": seed,
        "multi_objective": multi_objective,
        "preference": list(preference) if preference is not None else None,
    }
    # the algorithm's budget (evaluations) and the packages it needs, checked before anything is written
    total = _budget(algorithm, options, genome, len(experts), budget_)
    _check_extras(algorithm, executor, address)
    out_dir = Path(out)
    log = TrialLog(out_dir, search_def, force=force, reset=_reset)
    try:
        return _run_locked(
            log, rec, sp, genome, options, method, experts, expert_idx, dump, search_def, out_dir, prog, total,
            objective=objective, objective_options=opts_objective, algorithm=algorithm, seed=seed,
            executor=executor, address=address, workers=workers, cpus_per_trial=cpus_per_trial,
            gpus_per_trial=gpus_per_trial, device=device, threads=threads, multi_objective=multi_objective,
            preference=preference, test_reason=test_reason,
        )  # fmt: skip
    finally:
        log.close()


def _run_locked(
    log: TrialLog,
    rec: Recipe,
    sp: SearchSpace,
    genome: Genome,
    options: Any,
    method: Any,
    experts: Sequence[str],
    expert_idx: Sequence[int],
    dump: Mapping[str, Any],
    search_def: Mapping[str, Any],
    out_dir: Path,
    prog: SearchProgress,
    total: int,
    *,
    objective: str,
    objective_options: Mapping[str, str],
    algorithm: str,
    seed: int,
    executor: str,
    address: str | None,
    workers: int,
    cpus_per_trial: float,
    gpus_per_trial: float,
    device: str | None,
    threads: int | None,
    multi_objective: bool,
    preference: Sequence[float] | None,
    test_reason: str | None,
) -> SearchResult:
    opts_objective = dict(objective_options)
    # what a killed run leaves behind; the folder is ours (locked), and only this driver writes the journal
    for stale in out_dir.glob(".tune-*"):  # Ray Tune's scratch
        shutil.rmtree(stale, ignore_errors=True)
    (out_dir / "optuna.journal.lock").unlink(missing_ok=True)  # Optuna's write lock (else a 30 s wait)
    dev = device or ("cuda" if gpus_per_trial > 0 else "cpu")
    from mergelab.search.objective import objective_kind

    plugin = objective_kind(split_spec(objective)[0]).plugin
    spec = WorkerSpec(
        recipe=dump,
        objective=objective,
        objective_options=opts_objective,
        space=sp.model_dump(mode="json") if len(genome) else None,
        device=dev,
        # a Ray worker computes with the CPUs Tune reserved for its trial; inline keeps this process's setting
        threads=threads if threads is not None else (max(1, int(cpus_per_trial)) if executor == "ray" else None),
        seed=seed,
        plugins=(plugin,) if plugin else (),
    )
    run = _Run(log, total, prog, algorithm)
    if test_reason:
        run.note(f"the objective reads test data ({test_reason}): --i-know-this-tunes-on-test-data was given")
    if log.resumed:
        run.note(f"resuming {out_dir}: {len(log.trials)} trial(s) already logged")
    prog.start(total, len(log.trials))
    backend: Any
    if executor == "inline":
        from mergelab.search.backends import InlineBackend

        backend = InlineBackend(spec, run.emit, out_dir)
    else:
        from mergelab.search.backends import RayBackend

        backend = RayBackend(
            spec,
            run.emit,
            out_dir,
            address=address,
            workers=workers,
            cpus_per_trial=cpus_per_trial,
            gpus_per_trial=gpus_per_trial,
        )
    extra: dict[str, Any] = {}
    try:
        if algorithm in OPTUNA_ALGORITHMS:
            extra = _run_optuna(run, backend, algorithm, options, genome, seed, multi_objective, spec, dump)
        elif algorithm == "map":
            extra = _run_map(run, backend, options, rec, method, experts, seed, preference, out_dir)
        else:
            payload = {
                "options": options.model_dump(mode="json"),
                "seed": seed,
                "budget": total,
                "replay": log.by_key(),
                "out": str(out_dir.resolve()),
            }
            backend.sequential(algorithm, payload)
    finally:
        backend.close()
        prog.end()
    return _finish(run, rec, expert_idx, algorithm, out_dir, search_def, extra, multi_objective, preference)


def _check_extras(algorithm: str, executor: str, address: str | None) -> None:
    """Import the optional packages this search needs (a one-line error names the extra)."""
    from mergelab.search._extras import require

    if executor == "ray":
        from mergelab.search.backends import import_ray

        import_ray(local=address is None)
    if algorithm in OPTUNA_ALGORITHMS:
        require("optuna")
    if algorithm == "map":
        require("scipy.optimize")
        require("pymoo")


def _budget(algorithm: str, options: Any, genome: Genome, n_experts: int, budget: int | None) -> int:
    if algorithm in ("evolver", "map") and n_experts < 2:
        raise RecipeError(f"{algorithm} needs at least 2 experts; the recipe has {n_experts}")
    if algorithm in OPTUNA_ALGORITHMS:
        assert budget is not None
        if algorithm == "grid":
            from mergelab.search.samplers import grid_size

            return min(budget, grid_size(genome))
        return budget
    if algorithm == "evolver":
        need = (1 if options.merger else n_experts) + options.max_iters * n_experts
        return need if budget is None else min(budget, need)
    if algorithm == "fw":
        return options.max_iters if budget is None else min(budget, options.max_iters)
    assert isinstance(options, MapOptions)
    p = map_alg.n_params(2 if options.nested else n_experts)
    samples = options.nested_samples if options.nested else options.samples or (n_experts + p)
    if samples < p:
        raise OptionError(
            f"map: {samples} samples for {2 if options.nested else n_experts} coefficients; the surrogate has "
            f"(T+1)(T+2)/2 = {p} parameters, so evaluate at least that many (algorithms.map.samples)"
        )
    need = _map_evaluations(options, n_experts)
    if budget is not None and budget < need:
        raise OptionError(f"--budget {budget}: MAP with these options evaluates {need} points; raise the budget")
    return need


def _map_evaluations(options: MapOptions, t: int) -> int:
    if options.nested:
        return t + (t - 1) * (options.nested_samples + 1)
    samples = options.samples or (t + map_alg.n_params(t))
    return samples + 1


# ----------------------------------------------------------------------------------------- Optuna


def _run_optuna(
    run: _Run,
    backend: Any,
    algorithm: str,
    options: Any,
    genome: Genome,
    seed: int,
    multi: bool,
    spec: WorkerSpec,
    recipe: Mapping[str, Any],
) -> dict[str, Any]:
    from mergelab.search.samplers import cma_sigma, distributions, make_sampler

    n_obj = 1
    tasks: list[str] = []
    if multi:
        from mergelab.search.objective import ObjectiveContext, build_objective

        obj = build_objective(spec.objective, ObjectiveContext(recipe, spec.device, dict(spec.objective_options)))
        tasks = list(obj.tasks)
        if len(tasks) < 2:
            raise OptionError(
                f"--multi-objective: the objective {spec.objective} declares {len(tasks)} task(s); it needs 2 or "
                "more (a python objective declares them in a `tasks` attribute)"
            )
        n_obj = len(tasks)
    if algorithm == "cma":
        _, note = cma_sigma(genome)
        if note:
            run.note(note)
    sampler = make_sampler(algorithm, genome, options, seed, n_obj)
    remaining = run.budget - len(run.log.trials)
    enqueue: list[dict[str, float]] = []
    if algorithm == "cma" and options.start_at_x0 and not run.log.records:
        enqueue.append(dict(zip(genome.names, genome.x0())))
    directions = ["maximize"] * n_obj
    backend.optuna(sampler, distributions(genome), remaining, directions, enqueue)
    return {"tasks": tasks} if multi else {}


# ----------------------------------------------------------------------------------------- MAP


def _coefficient_assignment(coef: str, x: Sequence[float]) -> Assignment:
    return Assignment({}, [{coef: float(c)} for c in x], {f"c{i}": float(c) for i, c in enumerate(x)})


def _evaluate_points(run: _Run, backend: Any, coef: str, points: np.ndarray, prefix: str) -> list[dict[str, Any]]:
    """Trials at coefficient vectors (rows), keyed ``prefix/i``; logged ones are not evaluated again."""
    done = run.log.by_key()
    items: list[dict[str, Any]] = []
    for i, x in enumerate(points):
        key = f"{prefix}/{i}"
        items.append(
            {
                "key": key,
                "coefficients": [float(c) for c in x],
                "assignment": _coefficient_assignment(coef, x).to_dict(),
            }
        )
    todo = [it for it in items if it["key"] not in done]
    for it in items:
        hit = done.get(it["key"])
        if hit is not None and not np.allclose(hit.get("coefficients", []), it["coefficients"]):
            raise OutputError(f"the trial log does not match this MAP run at {it['key']}; start afresh with --force")
    got = {r["key"]: r for r in backend.batch(todo)} if todo else {}
    return [done.get(it["key"]) or got[it["key"]] for it in items]


def _metrics(records: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> np.ndarray:
    return np.array([[float(r["scores"]["metrics"][t]) for t in tasks] for r in records])


def _run_map(
    run: _Run,
    backend: Any,
    options: MapOptions,
    rec: Recipe,
    method: Any,
    experts: Sequence[str],
    seed: int,
    preference: Sequence[float] | None,
    out: Path,
) -> dict[str, Any]:
    coef = options.coefficient
    if not any(coef in (n, f.alias) for n, f in method.model_params.model_fields.items()):
        raise RecipeError(f"map: {method.name} has no per-model parameter {coef!r} to carry the coefficients")
    t = len(experts)
    if t < 2:
        raise RecipeError("map needs at least 2 experts")
    rng = np.random.default_rng(seed)
    pref_given = list(preference) if preference is not None else options.preference
    if options.nested:
        return _run_map_nested(run, backend, options, experts, rng, pref_given, seed, out)
    total = options.samples or (t + map_alg.n_params(t))
    if total < map_alg.n_params(t):
        raise OptionError(
            f"map: {total} samples for {t} tasks; the surrogate has (T+1)(T+2)/2 = {map_alg.n_params(t)} parameters, "
            "so evaluate at least that many (algorithms.map.samples)"
        )
    x = map_alg.sample_points(t, total, options.prop_isotropic, rng)
    records = _evaluate_points(run, backend, coef, x, "map/0")
    tasks = list(records[0]["scores"]["metrics"])
    kinds = [records[0]["scores"]["kinds"].get(k, "accuracy") for k in tasks]
    y = _metrics(records, tasks)
    params = [map_alg.fit_surrogate(x, y[:, k], kinds[k]) for k in range(len(tasks))]
    front = map_alg.pareto_front(
        params,
        kinds,
        t,
        domain=options.domain,
        population=options.population,
        generations=options.generations,
        seed=seed,
    )
    pref = pref_given or [1.0] * len(tasks)
    if len(pref) != len(tasks):
        raise OptionError(f"--preference: {len(pref)} weights for {len(tasks)} tasks ({', '.join(tasks)})")
    i = map_alg.choose(front, pref, kinds)
    chosen = front.x[i]
    inside = map_alg.in_hull(x, chosen)
    if not inside:
        run.note(
            f"MAP's choice {np.round(chosen, 3).tolist()} lies outside the convex hull of the evaluated points: the "
            "surrogates extrapolate there (algorithms.map.domain: [0, 1] keeps the search inside the sampled box)"
        )
    (best,) = _evaluate_points(run, backend, coef, chosen[None, :], "map/choice")
    fitted = [map_alg.surrogate(p, x, k) for p, k in zip(params, kinds)]
    detail = {
        "tasks": tasks,
        "kinds": kinds,
        "samples": x.tolist(),
        "measured": y.tolist(),
        "surrogate_params": [p.tolist() for p in params],
        "surrogate_rmse": [float(np.sqrt(np.mean((f - y[:, k]) ** 2))) for k, f in enumerate(fitted)],
        "front": {"coefficients": front.x.tolist(), "predicted": front.metrics.tolist()},
        "preference": pref,
        "choice": {
            "coefficients": chosen.tolist(),
            "predicted": front.metrics[i].tolist(),
            "measured": [float(best["scores"]["metrics"][k]) for k in tasks],
            "inside_sampled_hull": inside,
        },
    }
    write_json(out / "map.json", detail)
    plot_pareto(
        out / "pareto.png",
        tasks,
        y.tolist(),
        front.metrics.tolist(),
        detail["choice"]["measured"],
        title="MAP: evaluated points, predicted front, chosen (measured)",
        front_label="predicted front (MAP)",
    )
    return {"best_key": best["key"], "map": detail}


def _run_map_nested(
    run: _Run,
    backend: Any,
    options: MapOptions,
    experts: Sequence[str],
    rng: np.random.Generator,
    pref_given: Sequence[float] | None,
    seed: int,
    out: Path,
) -> dict[str, Any]:
    t = len(experts)
    coef = options.coefficient
    anchors = _evaluate_points(run, backend, coef, np.eye(t), "map/anchor")
    tasks = list(anchors[0]["scores"]["metrics"])
    if len(tasks) != t:
        raise OptionError(
            f"map nested: the objective scores {len(tasks)} tasks for {t} experts; nested MAP pairs expert i with "
            "task i"
        )
    kinds = {anchors[0]["scores"]["kinds"].get(k, "accuracy") for k in tasks}
    if len(kinds) != 1:
        raise OptionError("map nested: the tasks mix accuracies and losses; nested MAP needs one kind")
    kind = kinds.pop()
    pref = list(pref_given or [1.0] * t)
    if len(pref) != t:
        raise OptionError(f"--preference: {len(pref)} weights for {t} tasks")
    groups: dict[str, dict[str, Any]] = {}
    accuracy: dict[str, float] = {}
    for i, task in enumerate(tasks):
        groups[task] = {"weights": np.eye(t)[i], "tasks": [task], "preference": pref[i]}
        accuracy[task] = float(anchors[i]["scores"]["metrics"][task])
    rounds = []
    r = 0
    best: dict[str, Any] | None = None
    while len(groups) > 1:
        a, b = map_alg.closest_pair(accuracy, list(groups))
        ga, gb = groups[a], groups[b]
        x = map_alg.sample_points(2, options.nested_samples, options.nested_prop_isotropic, rng)
        weights = x[:, :1] * ga["weights"][None, :] + x[:, 1:] * gb["weights"][None, :]
        records = _evaluate_points(run, backend, coef, weights, f"map/r{r}")
        y = np.array(
            [[np.mean([float(rc["scores"]["metrics"][k]) for k in g["tasks"]]) for g in (ga, gb)] for rc in records]
        )
        params = [map_alg.fit_surrogate(x, y[:, k], kind) for k in range(2)]
        front = map_alg.pareto_front(
            params, [kind, kind], 2, domain=options.domain, population=options.population,
            generations=options.generations, seed=seed + r,
        )  # fmt: skip
        i = map_alg.choose(front, [ga["preference"], gb["preference"]], [kind, kind])
        c = front.x[i]
        if not map_alg.in_hull(x, c):
            run.note(f"nested MAP round {r} ({a} + {b}): the choice {np.round(c, 3).tolist()} extrapolates the samples")
        merged_w = c[0] * ga["weights"] + c[1] * gb["weights"]
        (best,) = _evaluate_points(run, backend, coef, merged_w[None, :], f"map/r{r}/choice")
        name = f"{a}+{b}"
        union = ga["tasks"] + gb["tasks"]
        accuracy[name] = float(np.mean([float(best["scores"]["metrics"][k]) for k in union]))
        rounds.append(
            {
                "pair": [a, b],
                "coefficients": c.tolist(),
                "weights": merged_w.tolist(),
                "predicted": front.metrics[i].tolist(),
            }
        )
        del groups[a], groups[b]
        groups[name] = {"weights": merged_w, "tasks": union, "preference": ga["preference"] + gb["preference"]}
        r += 1
    assert best is not None
    write_json(
        out / "map.json", {"nested": True, "tasks": tasks, "rounds": rounds, "final_weights": rounds[-1]["weights"]}
    )
    return {"best_key": best["key"], "map": {"nested": True, "rounds": rounds}}


# ----------------------------------------------------------------------------------------- outputs


def _best(records: Sequence[dict[str, Any]], extra: Mapping[str, Any], algorithm: str) -> dict[str, Any] | None:
    """The trial the result comes from: MAP's evaluated choice, Frank–Wolfe's last iterate, else the
    best score (Evolver: the final population's or best individual's score, which only grows)."""
    if "best_key" in extra:
        return next((r for r in records if r.get("key") == extra["best_key"]), None)
    if algorithm == "fw":
        return records[-1] if records else None
    scored = [r for r in records if r.get("score") is not None and math.isfinite(float(r["score"]))]
    return max(scored, key=lambda r: (float(r["score"]), -int(r["trial"]))) if scored else None


def _weights_recipe(rec: Recipe, model: str) -> dict[str, Any]:
    """A plain recipe that reproduces one weights file (``linear`` of one model: the model itself)."""
    data: dict[str, Any] = {"merge_method": "linear", "models": [{"model": model}]}
    if rec.base_model:
        data["base_model"] = rec.base_model
    for k in ("dtype", "out_dtype", "tokenizer_source"):
        v = getattr(rec, k)
        if v is not None:
            data[k] = v
    return data


def _best_recipe(
    rec: Recipe, expert_idx: Sequence[int], algorithm: str, best: Mapping[str, Any] | None, out: Path
) -> tuple[str | None, dict[str, Any]]:
    import json

    import yaml

    info: dict[str, Any] = {}
    if algorithm == "evolver":
        path = out / "evolver" / "result.json"
        if not path.is_file():
            return None, info
        res = json.loads(path.read_text())
        info = res
        if res.get("variant") == "merger":
            models = list(rec.models)
            for k, (i, file) in enumerate(zip(expert_idx, res["population"])):
                del k
                models[i] = models[i].model_copy(update={"model": file})
            text = rec.model_copy(update={"models": models}).to_yaml()
        else:
            text = yaml.safe_dump(_weights_recipe(rec, res["model"]), sort_keys=False)
        return text, info
    if algorithm == "fw":
        path = out / "fw" / "result.json"
        if not path.is_file():
            return None, info
        res = json.loads(path.read_text())
        return yaml.safe_dump(_weights_recipe(rec, res["model"]), sort_keys=False), res
    if best is None:
        return None, info
    assignment = Assignment.from_dict(best)
    return apply_assignment(rec, assignment, expert_idx).to_yaml(), info


def _finish(
    run: _Run,
    rec: Recipe,
    expert_idx: Sequence[int],
    algorithm: str,
    out: Path,
    search_def: Mapping[str, Any],
    extra: Mapping[str, Any],
    multi: bool,
    preference: Sequence[float] | None,
) -> SearchResult:
    records = run.log.trials
    best = _best(records, extra, algorithm)
    if multi and preference is not None and records and "best_key" not in extra:
        tasks = list(records[0]["scores"]["tasks"])
        if len(preference) != len(tasks):
            raise OptionError(f"--preference: {len(preference)} weights for {len(tasks)} tasks ({', '.join(tasks)})")
        norm = math.sqrt(sum(p * p for p in preference)) or 1.0
        best = max(
            records, key=lambda r: sum(p / norm * float(r["scores"]["tasks"][k]) for p, k in zip(preference, tasks))
        )
    if records:
        write_trials(out, records)
        plot_convergence(out / "convergence.png", records, f"{algorithm}: {search_def['objective']}")
    text, info = _best_recipe(rec, expert_idx, algorithm, best, out)
    if text is not None:
        header = (
            f"# best recipe of a mergelab search ({algorithm}, objective {search_def['objective']}"
            + (f", trial {best['trial']}, score {float(best['score']):.6g}" if best is not None else "")
            + ")\n"
        )
        write_atomic(out / "best_recipe.yaml", header + text)
    if multi and records:
        tasks = list(extra.get("tasks") or records[0]["scores"]["tasks"])
        front = non_dominated_records(records, tasks)
        write_json(out / "pareto.json", {"tasks": tasks, "trials": [r["trial"] for r in front]})
        plot_pareto(
            out / "pareto.png",
            tasks,
            [[float(r["scores"]["tasks"][k]) for k in tasks] for r in records],
            [[float(r["scores"]["tasks"][k]) for k in tasks] for r in front],
            title=f"{algorithm}: trials and their non-dominated set",
            front_label="non-dominated trials",
        )
    finished = [r for r in records if r.get("finished")]
    elapsed = time.perf_counter() - run.t0
    eval_seconds = sum(float(r.get("seconds") or 0) for r in records)
    summary = {
        "search": dict(search_def),
        "budget": run.budget,
        "trials": len(records),
        "best": best,
        "best_score": None if best is None else best.get("score"),
        "seconds_this_run": round(elapsed, 2),
        "trials_this_run": len(finished) - run.logged_before,
        "trials_per_minute_this_run": round(60 * (len(finished) - run.logged_before) / elapsed, 2)
        if elapsed > 0
        else None,
        "trial_seconds_total": round(eval_seconds, 2),
        "notes": list(run.notes),
        **({"result": info} if info else {}),
        **({k: v for k, v in extra.items() if k not in ("best_key",)}),
    }
    write_json(out / "search.json", summary)
    return SearchResult(out, best, records, summary, list(run.notes))
