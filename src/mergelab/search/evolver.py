"""Evolver (Du et al., "Knowledge Fusion by Evolving Weights of Language Models", ACL Findings 2024).

A population of models evolves in weight space. The individuals are the T fine-tuned experts
(every merged tensor, flattened together; the session's resident inputs, so nothing is read again).
Per iteration (``max_iters`` = 15) each individual x_i in turn:

1. **mutation** toward a reference individual: x' = (1 − f)·x_i + f·x_ref (f = 0.5). This is not
   classic differential evolution's x_a + F(x_b − x_c).
2. **crossover**, per coordinate of the whole model: each entry of the candidate comes from x'
   with probability ``cr`` (0.5), else from x_i.
3. **selection**: the candidate replaces x_i only if the validation score improves.

Two variants, as in the official code (duguodong7/model-evolution ``src/model_merge/evolver.py``):

* ``merger: false`` (the paper's Evolver, ``evolve``): each individual is scored on its own (the
  objective's score of that model); the reference is a random other individual with probability
  p = 0.5/(max_iters − iter) + 0.5, else the best other one; individuals are visited in order; the
  output is the best individual.
* ``merger: true`` ("Evolver + merger", ``evolve_with_merger``): the fitness of a candidate is the
  score of the **merged population** (the recipe's method and parameters, e.g. task arithmetic or
  TIES); the reference is always a random other individual; each iteration visits the individuals
  in a random order; one incumbent score is kept and a candidate is accepted if the merged score
  improves. The output is the final population, merged.

Selection here uses the validation objective only. The official merger variant keeps, as its
result, the population with the best **test** score seen during the run (``best_test_score`` from
``test_score_func2``): test data selects the model there. mergelab never does that: since a
candidate is accepted only when the validation score improves, the population kept is the last one,
which is also the one with the best validation score.

Randomness: one ``numpy`` generator (reference choices, visiting order, the p draw) and one
``torch`` generator (the crossover masks, drawn tensor by tensor in the plan's order on the CPU),
both seeded from the search seed; a resumed run replays the same draws and takes the logged scores
instead of evaluating again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab.errors import OutputError, RecipeError
from mergelab.search.options import EvolverOptions
from mergelab.search.worker import TrialWorker, measure_trial

Tensor = torch.Tensor


# --------------------------------------------------------------------------- the operator (pure)


def reference_probability(iteration: int, max_iters: int) -> float:
    """p = 0.5/(max_iters − iter) + 0.5: the chance of a random (not the best) reference, iter from 0."""
    return 0.5 / (max_iters - iteration) + 0.5


def best_other(scores: Sequence[float], index: int) -> int:
    """The index of the best score other than ``index`` (first of equals)."""
    best, best_i = -float("inf"), -1
    for i, s in enumerate(scores):
        if i != index and s > best:
            best, best_i = s, i
    return best_i


def choose_reference(
    rng: np.random.Generator, index: int, size: int, scores: Sequence[float] | None, iteration: int, max_iters: int
) -> int:
    """The reference individual: random other (always with a merger, i.e. ``scores`` None), else
    random other with probability p and the best other otherwise. Draws: one uniform for p (no
    merger), one choice among the others."""
    others = [i for i in range(size) if i != index]
    if scores is None:
        return int(others[int(rng.integers(len(others)))])
    u = float(rng.random())
    pick = int(others[int(rng.integers(len(others)))])  # drawn every time, so draws do not depend on u
    return pick if u < reference_probability(iteration, max_iters) else best_other(scores, index)


def mutate_crossover(
    x_i: Tensor, x_ref: Tensor, f: float, cr: float, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The candidate for ``x_i``: where a uniform draw < ``cr``, (1 − f)·x_i + f·x_ref, else x_i.
    Returns (candidate, mask of the coordinates taken from the mutant)."""
    u = torch.rand(x_i.shape, generator=generator, dtype=torch.float32)
    mask = (u < cr).to(x_i.device)
    mutant = x_i * (1 - f) + x_ref * f
    return torch.where(mask, mutant, x_i), mask


def candidate(
    population: Sequence[Mapping[str, Tensor]], index: int, ref: int, f: float, cr: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Mutation + crossover over every tensor of individual ``index`` (tensor order: the mapping's)."""
    return {
        name: mutate_crossover(x, population[ref][name], f, cr, generator)[0] for name, x in population[index].items()
    }


def accept(candidate_score: float, incumbent: float) -> bool:
    """Selection: strictly better only (the official code's ``>``)."""
    return candidate_score > incumbent


# --------------------------------------------------------------------------- the run (in a worker)


def _save(state: Mapping[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from None


def run_in_worker(worker: TrialWorker, payload: dict[str, Any], report: Callable[[dict[str, Any]], Any]) -> None:
    """Run Evolver on the worker's resident experts. ``payload``: ``options``, ``seed``, ``budget``
    (evaluations), ``replay`` (logged records by key, taken instead of evaluating again) and ``out``
    (the search folder: ``evolver/`` gets the result's weights and ``result.json``)."""
    opts = EvolverOptions.model_validate(payload["options"])
    replay: Mapping[str, Mapping[str, Any]] = payload.get("replay", {})
    budget: int = payload["budget"]
    out = Path(payload["out"]) / "evolver"
    session = worker.session
    size = len(session.experts)
    if size < 2:
        raise RecipeError("evolver needs at least 2 experts (a population of one has no reference)")
    rng = np.random.default_rng(payload["seed"])
    gen = torch.Generator().manual_seed(int(payload["seed"]))
    population = [session.expert_tensors(i) for i in range(size)]
    used = 0

    def evaluate(
        key: str, state_fn: Callable[[], Mapping[str, Tensor]], extra: dict[str, Any]
    ) -> tuple[float, dict | None]:
        """(score, record to report, or None when the logged record is replayed)."""
        nonlocal used
        used += 1
        hit = replay.get(key)
        if hit is not None:
            for k in ("individual", "reference"):
                if k in extra and hit.get(k) != extra[k]:
                    raise OutputError(
                        f"the trial log does not match this Evolver run at {key} ({k}); start afresh with --force"
                    )
            return float(hit["score"]), None
        measured = measure_trial(state_fn, worker.score, worker.where)
        return measured["score"], {"key": key, "algorithm": "evolver", **extra, **measured}

    def send(record: dict | None, **more: Any) -> None:
        if record is not None:
            report({**record, **more})

    result: dict[str, Any] = {"variant": "merger" if opts.merger else "individuals", "evaluations": 0}
    if opts.merger:
        score, rec = evaluate("evolver/init", session.merge, {"iteration": -1})
        send(rec, accepted=True, incumbent=score)
        for it in range(opts.max_iters):
            for idx in (int(i) for i in rng.permutation(size)):
                if used >= budget:
                    break
                ref = choose_reference(rng, idx, size, None, it, opts.max_iters)
                cand = candidate(population, idx, ref, opts.f, opts.cr, gen)
                old = population[idx]
                session.replace_expert(idx, cand)
                s, rec = evaluate(
                    f"evolver/{it}/{idx}", session.merge, {"iteration": it, "individual": idx, "reference": ref}
                )
                ok = accept(s, score)
                if ok:
                    population[idx], score = cand, s
                else:
                    session.replace_expert(idx, old)
                send(rec, accepted=ok, incumbent=score)
        files = []
        for i in range(size):
            path = out / f"population-{i}.safetensors"
            _save(session.assemble(population[i]), path)
            files.append(str(path))
        result.update({"score": score, "population": files})
    else:
        scores: list[float] = []
        for i in range(size):
            s, rec = evaluate(
                f"evolver/init/{i}", partial(session.assemble, population[i]), {"iteration": -1, "individual": i}
            )
            scores.append(s)
            send(rec, accepted=True, incumbent=s)
        for it in range(opts.max_iters):
            for idx in range(size):
                if used >= budget:
                    break
                ref = choose_reference(rng, idx, size, scores, it, opts.max_iters)
                cand = candidate(population, idx, ref, opts.f, opts.cr, gen)
                s, rec = evaluate(
                    f"evolver/{it}/{idx}",
                    partial(session.assemble, cand),
                    {"iteration": it, "individual": idx, "reference": ref},
                )
                ok = accept(s, scores[idx])
                if ok:
                    population[idx], scores[idx] = cand, s
                send(rec, accepted=ok, incumbent=scores[idx])
        best = int(np.argmax(scores))
        path = out / "best.safetensors"
        _save(session.assemble(population[best]), path)
        result.update({"score": scores[best], "best": best, "scores": scores, "model": str(path)})
    result["evaluations"] = used
    _write_json(result, out / "result.json")


def _write_json(data: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
