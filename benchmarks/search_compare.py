"""Coefficient search on a zoo: algorithms at equal budgets, MAP against a brute-force grid, throughput.

Three parts (``--parts``, default all), every search through ``mergelab.search.run_search`` on the
zoo's validation split; the test split is read only for the final report of each chosen merge:

* ``compare``: grid, random, CMA-ES, TPE and Evolver (its merged-population variant, the same
  method as the others) at the same number of evaluations (``--budget``), for ``--methods``
  (default task arithmetic and TIES) with per-layer-group coefficients (``--layer-granularity``;
  weights, TIES also densities and λ), ``--seeds`` repeats. Reports the best validation score, its
  test score, time, and the best-so-far curve per evaluation.
* ``map``: MAP on the first T tasks (``--map-t``, default 2 and 3; task arithmetic, one coefficient
  per expert) against a brute-force grid of [0, 1]^T (``--map-grid`` points per axis, one number per
  T): the grid's measured Pareto front, MAP's predicted front (its distance to the grid's front:
  inverted generational distance), MAP's choice measured against the grid's best point for the same
  preference, and the evaluations MAP saved. ``--map-domain 0,1`` keeps MAP's front search inside
  the sampled box (default: the official [−3, 3]).
* ``throughput``: trials per minute of a random TIES search (task arithmetic on the LM suite) with 1
  and 2 Ray workers (local Ray, ``--cpus-per-trial`` each): steady state (from the moment every
  worker has finished its first trial, i.e. read the experts and built the objective, to the last
  trial) and end to end (Ray's start included).

Writes ``search_compare.json`` (LM: ``search_compare_lm.json``), the markdown beside it and plots into
``--out`` (default ``benchmarks/results/search/SUITE-ZOO/``); ``--update`` keeps the parts (and MAP's
other task counts) of an existing result there, so the parts can run as separate processes. The
search folders go to ``--out/runs/`` (``--keep-runs`` keeps them). The committed results:

    python benchmarks/search_compare.py --zoo zeroshot-quick --parts throughput --throughput-trials 40
    python benchmarks/search_compare.py --zoo zeroshot-quick --parts compare --budget 50 --update
    python benchmarks/search_compare.py --zoo zeroshot-quick --parts compare --methods ties --seeds 1 \\
        --budget 50 --update
    python benchmarks/search_compare.py --zoo zeroshot-quick --parts map --map-grid 11,6 --update
    python benchmarks/search_compare.py --suite lm --parts throughput --throughput-trials 12
    python benchmarks/search_compare.py --suite lm --parts compare --methods task_arithmetic --budget 20 \\
        --layer-granularity 10 --update
    python benchmarks/search_compare.py --suite lm --parts map --map-t 2 --map-grid 5 --update
    python benchmarks/search_compare.py --suite lm --parts map --map-t 3 --map-grid 5 --update

Needs ``pip install 'mergelab[search]'`` and a built zoo (``mergelab zoo build``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ("grid", "random", "cma", "tpe", "evolver")


# ------------------------------------------------------------------------------------------ helpers


def _recipe(zoo: Any, method: str, tasks: list[str], folder: Path, parameters: dict[str, Any] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"recipe-{method}-{len(tasks)}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": method,
                "base_model": str(zoo.base_dir),
                "models": [{"model": str(zoo.expert_model_dir(t))} for t in tasks],
                "parameters": dict(parameters or {}),
            },
            sort_keys=False,
        )
    )
    return path


def _space(method: str, granularity: int, budget: int, recipe: Path, n_experts: int) -> dict[str, Any]:
    """Weights per expert and layer group (TIES: also densities, and λ per group), mergekit-evolve's
    decoding; the grid's points per coordinate are the most the budget covers (at least 2)."""
    from mergelab.api import plan_merge

    mp: dict[str, Any] = {"weight": {"low": 0.0, "high": 1.0}}
    gp: dict[str, Any] = {}
    if method == "ties":
        mp["density"] = {"low": 0.0, "high": 1.0}
        gp["lambda"] = {"low": 0.5, "high": 2.0}
    groups = 1
    if granularity:
        plan = plan_merge(recipe)
        groups = (plan.num_layers or granularity) // granularity
        plan.close()
    dims = groups * (n_experts * len(mp) + len(gp))
    points = max(2, math.floor(budget ** (1 / dims)))
    return {"model_parameters": mp, "parameters": gp, "layer_granularity": granularity, "grid_points": points}


def _test_score(zoo: Any, suite: str, best_recipe: Path, test_limit: int | None) -> float | None:
    """The chosen merge on the test split (the only read of the test split)."""
    from mergelab.executors.memory import MergeSession

    state = MergeSession(str(best_recipe)).merge()
    rows = test_limit if test_limit and test_limit > 0 else None
    if suite == "lm":
        from mergelab_bench.eval.lm_harness import LMEvaluator

        report = LMEvaluator(zoo, split="test", limit=rows).evaluate(state)
    else:
        from mergelab_bench.eval.harness import Evaluator

        report = Evaluator(zoo, split="test", limit=rows).evaluate(state)
    return report.average_normalized


def _curve(trials: list[dict[str, Any]]) -> list[float]:
    best, out = -math.inf, []
    for r in trials:
        best = max(best, float(r["score"]))
        out.append(best)
    return out


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------ parts


def part_compare(args: argparse.Namespace, zoo: Any, runs: Path) -> dict[str, Any]:
    from mergelab.search import run_search

    out: dict[str, Any] = {}
    objective, opts = _objective(args)
    for method in args.methods:
        recipe = _recipe(zoo, method, list(zoo.tasks), runs, {"lambda": 1.0})
        space = _space(method, args.layer_granularity, args.budget, recipe, len(zoo.tasks))
        rows = []
        for algorithm, seed in itertools.product(ALGORITHMS, args.seeds):
            sp = dict(space)
            if algorithm == "evolver":
                sp = {"algorithms": {"evolver": {"merger": True, "max_iters": 1000}}}
            t0 = time.perf_counter()
            res = run_search(
                recipe, objective=objective, objective_options=opts, space=sp, algorithm=algorithm,
                budget=args.budget, out=runs / f"{method}-{algorithm}-{seed}", seed=seed, executor=args.executor,
                workers=args.workers, force=True,
            )  # fmt: skip
            seconds = time.perf_counter() - t0
            test = _test_score(zoo, args.suite, res.out / "best_recipe.yaml", args.test_limit)
            row = {
                "method": method,
                "algorithm": algorithm,
                "seed": seed,
                "evaluations": len(res.trials),
                "best_validation": None if res.best is None else float(res.best["score"]),
                "test": test,
                "seconds": round(seconds, 1),
                "curve": _curve(res.trials),
                "command": "python " + " ".join(sys.argv),
            }
            rows.append(row)
            print(
                f"{method:16s} {algorithm:8s} seed {seed}: val {row['best_validation']:.4f} test {test} "
                f"({seconds:.0f} s)"
            )
        out[method] = {"space": space, "rows": rows}
        _plot_curves(args.out / f"convergence-{method}.png", method, rows)
    return out


def _merge_compare(args: argparse.Namespace, old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """``--update``: the earlier result's rows of other methods and seeds stay beside this run's (same
    budget and layer granularity, else refused); the convergence plots are redrawn from every row."""
    if not old or "compare" not in old:
        return new
    before = old.get("configs", {}).get("compare", old["config"])
    for key in ("budget", "layer_granularity", "validation_limit", "test_limit"):
        if before.get(key) != getattr(args, key):
            raise SystemExit(
                f"--update: the stored comparison has {key} {before.get(key)}, this run {getattr(args, key)}"
            )
    merged = {m: dict(b) for m, b in old["compare"].items()}
    for method, block in new.items():
        kept = [r for r in merged.get(method, {}).get("rows", []) if r["seed"] not in args.seeds]
        merged[method] = {"space": block["space"], "rows": kept + block["rows"]}
        _plot_curves(args.out / f"convergence-{method}.png", method, merged[method]["rows"])
    return merged


def _plot_curves(path: Path, method: str, rows: list[dict[str, Any]]) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=120)
    for i, algorithm in enumerate(ALGORITHMS):
        curves = [r["curve"] for r in rows if r["algorithm"] == algorithm]
        if not curves:
            continue
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        # distinct dashes: TPE's first trials are random's (same seed), so their curves may coincide
        ax.plot(range(1, n + 1), mean, label=algorithm, color=f"C{i}", linestyle=("-", "--", "-.", ":", "-")[i], lw=1.6)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best validation score so far")
    ax.set_title(f"{method}: per-layer-group coefficients", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _objective(args: argparse.Namespace) -> tuple[str, dict[str, str]]:
    opts = {"zoo": args.zoo, "limit": str(args.validation_limit)}
    if args.cache:
        opts["cache"] = args.cache
    return ("lm:validation" if args.suite == "lm" else "zoo:validation"), opts


def _igd(reference: np.ndarray, approx: np.ndarray) -> float:
    """Mean distance from each reference point to its nearest approximation point."""
    if len(reference) == 0 or len(approx) == 0:
        return math.nan
    d = np.linalg.norm(reference[:, None, :] - approx[None, :, :], axis=2)
    return float(d.min(axis=1).mean())


def part_map(args: argparse.Namespace, zoo: Any, runs: Path) -> dict[str, Any]:
    from mergelab.search import map as map_alg
    from mergelab.search import run_search

    objective, opts = _objective(args)
    out: dict[str, Any] = {}
    for t in args.map_t:
        if len(zoo.tasks) < t:
            continue
        tasks = list(zoo.tasks)[:t]
        recipe = _recipe(zoo, "task_arithmetic", tasks, runs, {"lambda": 1.0})
        task_opts = {**opts, "tasks": "+".join(tasks)}
        t0 = time.perf_counter()
        mres = run_search(
            recipe, objective=objective, objective_options=task_opts, algorithm="map", out=runs / f"map-T{t}",
            space={"algorithms": {"map": {"domain": args.map_domain}}} if args.map_domain else None,
            executor=args.executor, workers=args.workers, force=True,
        )  # fmt: skip
        map_seconds = time.perf_counter() - t0
        detail = json.loads((mres.out / "map.json").read_text())
        points = args.map_grid[min(t - 2, len(args.map_grid) - 1)]
        values = [i / (points - 1) for i in range(points)]
        space = {"model_parameters": {"weight": {"low": 0.0, "high": 1.0, "grid": values}}, "decode": "direct"}
        t0 = time.perf_counter()
        gres = run_search(
            recipe, objective=objective, objective_options=task_opts, space=space, algorithm="grid",
            budget=points**t, out=runs / f"grid-T{t}", executor=args.executor, workers=args.workers, force=True,
        )  # fmt: skip
        grid_seconds = time.perf_counter() - t0
        kinds = detail["kinds"]
        signs = np.array([1.0 if k == "accuracy" else -1.0 for k in kinds])
        measured = np.array([[float(r["scores"]["metrics"][k]) for k in detail["tasks"]] for r in gres.trials])
        front_idx = map_alg.non_dominated(-(measured * signs))
        grid_front = measured[front_idx]
        predicted = np.array(detail["front"]["predicted"])
        inside = np.all(
            (np.array(detail["front"]["coefficients"]) >= 0) & (np.array(detail["front"]["coefficients"]) <= 1), axis=1
        )
        pref = np.asarray(detail["preference"], dtype=float)
        pref = pref / np.linalg.norm(pref)
        grid_best = int(np.argmax((measured * signs) @ pref))
        choice = detail["choice"]
        out[f"T{t}"] = {
            "tasks": tasks,
            "command": "python " + " ".join(sys.argv),
            "grid_points_per_axis": points,
            "map_domain": args.map_domain or [-3.0, 3.0],
            "map_evaluations": len(mres.trials),
            "grid_evaluations": len(gres.trials),
            "evaluations_saved": len(gres.trials) - len(mres.trials),
            "map_seconds": round(map_seconds, 1),
            "grid_seconds": round(grid_seconds, 1),
            "igd_predicted_front_to_grid_front": _igd(grid_front, predicted),
            "igd_predicted_front_in_unit_box_to_grid_front": _igd(grid_front, predicted[inside]),
            "surrogate_rmse": detail["surrogate_rmse"],
            "map_choice": choice,
            "grid_best": {
                "coefficients": [float(c) for c in gres.trials[grid_best]["values"].values()],
                "measured": measured[grid_best].tolist(),
                "preference_score": float((measured[grid_best] * signs) @ pref),
            },
            "map_choice_preference_score": float((np.array(choice["measured"]) * signs) @ pref),
        }
        _plot_map(args.out / f"map-T{t}.png", detail["tasks"], measured, grid_front, predicted, choice)
        print(
            f"MAP T={t}: {len(mres.trials)} evaluations vs grid {len(gres.trials)}; "
            f"IGD {out[f'T{t}']['igd_predicted_front_to_grid_front']:.4f}"
        )
    return out


def _plot_map(
    path: Path, tasks: list[str], measured: np.ndarray, grid_front: np.ndarray, predicted: np.ndarray, choice: dict
) -> None:
    plt = _pyplot()
    pairs = list(itertools.combinations(range(len(tasks)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.4 * len(pairs), 3.8), dpi=120, squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        ax.scatter(measured[:, i], measured[:, j], s=8, color="#9cc3e6", label="grid (measured)")
        ax.scatter(grid_front[:, i], grid_front[:, j], s=30, marker="*", color="C3", label="grid Pareto front")
        ax.scatter(
            predicted[:, i], predicted[:, j], s=6, marker=">", color="C4", alpha=0.5, label="MAP front (predicted)"
        )
        ax.scatter(
            [choice["measured"][i]], [choice["measured"][j]], s=90, marker="X", color="k", label="MAP choice (measured)"
        )
        ax.set_xlabel(tasks[i])
        ax.set_ylabel(tasks[j])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def part_throughput(args: argparse.Namespace, zoo: Any, runs: Path) -> dict[str, Any]:
    from mergelab.search import run_search

    objective, opts = _objective(args)
    method = "ties" if args.suite != "lm" else "task_arithmetic"
    recipe = _recipe(zoo, method, list(zoo.tasks), runs, {"lambda": 1.0})
    space = _space(method, args.layer_granularity, args.throughput_trials, recipe, len(zoo.tasks))
    out: dict[str, Any] = {"method": method, "trials": args.throughput_trials, "cpus_per_trial": args.cpus_per_trial}
    for workers in (1, 2):
        t0 = time.perf_counter()
        res = run_search(
            recipe, objective=objective, objective_options=opts, space=space, algorithm="random",
            budget=args.throughput_trials, out=runs / f"throughput-{workers}", executor="ray", workers=workers,
            cpus_per_trial=args.cpus_per_trial, force=True,
        )  # fmt: skip
        wall = time.perf_counter() - t0
        times = sorted(float(r["time"]) for r in res.trials)
        # steady state: from the moment every worker has finished its first trial (its session and
        # objective built) to the last trial
        first = max(
            min(float(r["time"]) for r in res.trials if r["worker"] == w) for w in {r["worker"] for r in res.trials}
        )
        after = [t for t in times if t > first]
        steady = 60 * len(after) / (after[-1] - first) if after and after[-1] > first else None
        per_trial = [float(r["seconds"]) for r in res.trials]
        out[f"workers_{workers}"] = {
            "wall_seconds": round(wall, 1),
            "trials_per_minute_end_to_end": round(60 * len(times) / wall, 2),
            "trials_per_minute_steady": None if steady is None else round(steady, 2),
            "trial_seconds_median": round(statistics.median(per_trial), 3),
            "merge_seconds_median": round(statistics.median(float(r["merge_seconds"]) for r in res.trials), 3),
            "eval_seconds_median": round(statistics.median(float(r["eval_seconds"]) for r in res.trials), 3),
            "workers_seen": len({r["worker"] for r in res.trials}),
        }
        print(f"{workers} worker(s): {out[f'workers_{workers}']}")
    return out


# ------------------------------------------------------------------------------------------ report


def markdown(result: dict[str, Any]) -> str:
    configs = result.get("configs", {})

    def setting(part: str, commands: list[str] | None = None) -> list[str]:
        c = configs.get(part, result["config"])
        runs = commands or [c["command"]]
        return [
            f"Validation rows per task: {c['validation_limit']}; test rows per task (chosen merges only): "
            f"{c['test_limit']}. {'Commands' if commands else 'Command'}: " + ", ".join(f"`{r}`" for r in runs) + ".",
            "",
        ]

    lines = [
        "# Coefficient search on the zoo",
        "",
        f"Zoo `{result['zoo']['name']}` ({result['config']['suite']}; tasks {', '.join(result['zoo']['tasks'])}), "
        f"machine: {result['machine']}. Searches read the validation split; the test split is read only to "
        "report each search's chosen merge.",
        "",
    ]
    for method, block in result.get("compare", {}).items():
        budget = configs.get("compare", result["config"])["budget"]
        commands = list(dict.fromkeys(r["command"] for r in block["rows"] if "command" in r))  # the rows' runs
        lines += [f"## {method}: per-layer-group coefficients, budget {budget}", "", *setting("compare", commands)]
        lines += [
            "| algorithm | seeds | evaluations | best validation (mean) | test (mean) | seconds (mean) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for algorithm in ALGORITHMS:
            rows = [r for r in block["rows"] if r["algorithm"] == algorithm]
            if not rows:
                continue

            def mean(key: str, rows: list[dict[str, Any]] = rows) -> str:
                vals = [r[key] for r in rows if r[key] is not None]
                return f"{statistics.mean(vals):.4f}" if vals else "–"

            lines.append(
                f"| {algorithm} | {len(rows)} | {statistics.mean(r['evaluations'] for r in rows):.0f} | "
                f"{mean('best_validation')} | {mean('test')} | {statistics.mean(r['seconds'] for r in rows):.0f} |"
            )
        lines += ["", f"![convergence](convergence-{method}.png)", ""]
    if result.get("map"):
        lines += ["## MAP against a brute-force grid", "", *setting("map")]
        lines += [
            "| T | MAP evaluations | grid evaluations | saved | IGD (predicted front → grid front) "
            "| IGD, front inside [0,1]^T | MAP choice (preference score) | grid best (preference score) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for key, d in result["map"].items():
            lines.append(
                f"| {key[1:]} | {d['map_evaluations']} | {d['grid_evaluations']} | {d['evaluations_saved']} | "
                f"{d['igd_predicted_front_to_grid_front']:.4f} | "
                f"{d['igd_predicted_front_in_unit_box_to_grid_front']:.4f} | "
                f"{d['map_choice_preference_score']:.4f} | {d['grid_best']['preference_score']:.4f} |"
            )
        lines += [""] + [
            f"T = {k[1:]}: grid of {d.get('grid_points_per_axis', '?')} points per axis; `{d['command']}`"
            for k, d in result["map"].items()
            if "command" in d
        ]
        for k, d in result["map"].items():
            box = d.get("map_choice_domain_0_1")
            if box:
                lines.append(
                    f"T = {k[1:]}, MAP's front searched inside [0, 1]^T instead ({box['evaluations']} evaluations): "
                    f"choice {[round(c, 3) for c in box['coefficients']]} measured {box['measured']}, preference "
                    f"score {box['preference_score']:.4f} ({box['how']})."
                )
        lines += [""] + [f"![MAP {k}](map-{k}.png)" for k in result["map"]] + [""]
    if result.get("throughput"):
        t = result["throughput"]
        lines += [
            f"## Trials per minute ({t['method']}, random search, {t['trials']} trials, local Ray)",
            "",
            *setting("throughput"),
            "| workers | steady trials/min | end-to-end trials/min | median trial s (merge, eval) | wall s |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for w in (1, 2):
            d = t[f"workers_{w}"]
            lines.append(
                f"| {w} | {d['trials_per_minute_steady']} | {d['trials_per_minute_end_to_end']} | "
                f"{d['trial_seconds_median']} ({d['merge_seconds_median']}, {d['eval_seconds_median']}) | "
                f"{d['wall_seconds']} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("classification", "lm"), default="classification")
    p.add_argument("--zoo", default=None, help="zoo preset or manifest [default: zeroshot-quick; lm: default]")
    p.add_argument("--cache", default=None)
    p.add_argument("--parts", default="compare,map,throughput")
    p.add_argument("--budget", type=int, default=60, help="evaluations per search (compare)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0])
    p.add_argument("--layer-granularity", type=int, default=3)
    p.add_argument("--methods", type=lambda s: [m.strip() for m in s.split(",")], default=["task_arithmetic", "ties"])
    p.add_argument("--validation-limit", type=int, default=None, help="rows per task [default: 100; lm: 32]")
    p.add_argument("--test-limit", type=int, default=None, help="rows per task [default: 300; lm: 128]")
    p.add_argument(
        "--map-grid", type=lambda s: [int(x) for x in s.split(",")], default=[11, 6],
        help="grid points per axis for T = 2 and T = 3 (one number: both)",
    )  # fmt: skip
    p.add_argument("--map-t", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3], help="task counts for MAP")
    p.add_argument(
        "--map-domain", type=lambda s: [float(x) for x in s.split(",")], default=None,
        help="LOW,HIGH: MAP's front search box [default: the official [-3, 3]; 0,1 stays inside the sampled box]",
    )  # fmt: skip
    p.add_argument("--throughput-trials", type=int, default=40)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--executor", choices=("ray", "inline"), default="inline", help="compare and map (throughput: ray)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="[default: benchmarks/results/search/SUITE-ZOO]")
    p.add_argument("--keep-runs", action="store_true")
    p.add_argument("--update", action="store_true", help="keep the other parts of an existing result in --out")
    args = p.parse_args()
    lm = args.suite == "lm"
    args.zoo = args.zoo or ("default" if lm else "zeroshot-quick")
    args.out = args.out or ROOT / "benchmarks" / "results" / "search" / f"{args.suite}-{Path(args.zoo).stem}"
    if args.validation_limit is None:
        args.validation_limit = 32 if lm else 100
    if args.test_limit is None:
        args.test_limit = 128 if lm else 300
    import mergelab_bench  # noqa: F401 - registers the zoo: and lm: objectives

    args.out.mkdir(parents=True, exist_ok=True)
    runs = args.out / "runs"
    from mergelab_bench.eval.runtime import load_suite_zoo

    zoo = load_suite_zoo(args.suite, args.zoo, cache=args.cache)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    result: dict[str, Any] = {
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "command": "python " + " ".join(sys.argv),
        },
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "zoo": {"name": zoo.name, "key": zoo.key, "tasks": list(zoo.tasks)},
    }
    stem = "search_compare" if args.suite == "classification" else "search_compare_lm"
    previous = args.out / f"{stem}.json"
    old: dict[str, Any] | None = None
    if args.update and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("zoo", {}).get("key") != zoo.key:
            raise SystemExit(
                f"{previous}: another zoo ({old.get('zoo', {}).get('name')}); drop --update or change --out"
            )
        for part in ("compare", "map", "throughput"):
            if part in old and part not in parts:
                result[part] = old[part]
                result.setdefault("configs", {})[part] = old.get("configs", {}).get(part, old["config"])
    for part in parts:
        result.setdefault("configs", {})[part] = result["config"]
    if "compare" in parts:
        result["compare"] = _merge_compare(args, old, part_compare(args, zoo, runs))
    if "map" in parts:
        # --update keeps the other task counts' MAP results (each row records its command)
        kept = {k: v for k, v in old.get("map", {}).items() if k not in {f"T{t}" for t in args.map_t}} if old else {}
        result["map"] = dict(sorted({**kept, **part_map(args, zoo, runs)}.items()))
    if "throughput" in parts:
        result["throughput"] = part_throughput(args, zoo, runs)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(result) + "\n")
    if not args.keep_runs:
        shutil.rmtree(runs, ignore_errors=True)
    print(f"wrote {args.out / (stem + '.md')}")


if __name__ == "__main__":
    main()
