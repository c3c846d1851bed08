"""Frank–Wolfe merging (FW-Merging; official code hmarkc/FW-Merging, ``discriminative/merge.py``
``frank_wolfe_merge``).

Merging as constrained optimisation over the pool of checkpoints: minimise the objective's loss
over (roughly) their convex hull with Frank–Wolfe steps.

* **Initialisation**: θ_0 = inner(base, experts): the inner merge (official default: TIES keeping
  30 % of each task vector, model-wide, scaled by 0.9: ``inner_method: ties``,
  ``inner_parameters: {lambda: 0.9, scope: global}``, ``inner_model_parameters: {density: 0.3}``).
  The official code then appends θ_0 to the pool (``include_initial``).
* **Gradient**: g = ∇ loss(θ_t), the objective's loss over its proxy examples (the benchmark's
  ``zoo:``: cross-entropy of every proxy row through its task's head; ``lm:``: per domain the mean
  token cross-entropy of the proxy rows, the answer tokens for exact-match domains, summed over
  domains).
* **Linear-minimisation oracle**, per tensor (``granularity: tensor``; the official code hard-codes
  this ``layer`` granularity): the pool checkpoint c (full weights θ_c, not task vectors) with the
  least cosine(g, θ_c). ``zero_fallback: true`` is the official code's behaviour: when even that
  cosine is ≥ 0 the tensor's target is zeros (the step pulls it toward 0); by default (the paper's
  oracle over the checkpoints) the argmin is taken whatever its sign. ``granularity: model``
  (FusionBench's ``task``) picks one checkpoint for every tensor by the sum of the cosines.
* **Step**: γ_t = 2/(t + 2) · ``step_size``.
* **Update**: θ_{t+1} = inner(base = θ_t, [s_t]) with the inner method's scale multiplied by γ_t,
  i.e. θ_t + 0.9·γ_t·TIES-trim(s_t − θ_t) with the default: a Frank–Wolfe step θ + γ(s − θ),
  sparsified. ``inner_method: task_arithmetic`` with ``lambda: 1`` is the plain step.

FusionBench's port (``fw_hard.py``) differs (task arithmetic 0.3, step size 0.1, task granularity,
no zero fallback): its choices are these options. Each iteration is logged with the per-tensor
choices, so a resumed run re-applies the logged steps without computing their gradients again.
The result is a model (written to ``fw/merged.safetensors``), not coefficients.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import OptionError, OutputError, RecipeError
from mergelab.search.options import FwOptions
from mergelab.search.worker import TrialWorker

Tensor = torch.Tensor


def step_size(iteration: int, scale: float = 1.0) -> float:
    """γ_t = 2/(t + 2) · scale, t from 0."""
    return 2.0 / (iteration + 2) * scale


def cosine(a: Tensor, b: Tensor) -> float:
    """cos(a, b) over the flattened tensors (0 when either is zero)."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    denom = float(a64.norm() * b64.norm())
    return 0.0 if denom == 0 else float(a64 @ b64) / denom


def lmo(
    grad: Mapping[str, Tensor],
    pool: Sequence[Mapping[str, Tensor]],
    *,
    zero_fallback: bool = False,
    granularity: str = "tensor",
) -> dict[str, int]:
    """The oracle's choice per tensor: the index into ``pool`` of the checkpoint least aligned with
    the gradient, or ``ZERO`` (−1) for zeros (``zero_fallback`` and the least cosine ≥ 0). Ties: the
    first."""
    names = list(grad)
    cos = {n: [cosine(grad[n], c[n]) for c in pool] for n in names}
    if granularity == "model":
        totals = [sum(cos[n][i] for n in names) for i in range(len(pool))]
        k = min(range(len(pool)), key=lambda i: (totals[i], i))
        pick = ZERO if zero_fallback and totals[k] >= 0 else k
        return dict.fromkeys(names, pick)
    out = {}
    for n in names:
        k = min(range(len(pool)), key=lambda i: (cos[n][i], i))
        out[n] = ZERO if zero_fallback and cos[n][k] >= 0 else k
    return out


ZERO = -1
"""The oracle's choice "zeros" (``zero_fallback``)."""
KEEP = -2
"""A tensor the loss does not depend on (no gradient, e.g. an unused pooler): its target is the
iterate itself, so the step leaves it unchanged."""


def target(
    choice: Mapping[str, int], pool: Sequence[Mapping[str, Tensor]], theta: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The vertex s: per tensor the chosen checkpoint's tensor, zeros, or the iterate (KEEP)."""
    out = {}
    for n, k in choice.items():
        out[n] = theta[n] if k == KEEP else torch.zeros_like(theta[n]) if k == ZERO else pool[k][n]
    return out


def inner_merge(
    opts: FwOptions, base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], scale: float, seed: int
) -> dict[str, Tensor]:
    """inner(base, models) with the inner method's scale parameter multiplied by ``scale``."""
    from mergelab.api import merge_state_dicts
    from mergelab.methods import get_method

    method = get_method(opts.inner_method)
    if method.scale is None:
        raise OptionError(
            f"fw inner_method {opts.inner_method!r} has no scale parameter (λ) to step with; use ties, "
            "task_arithmetic, dare_ties or another method with lambda"
        )
    params = dict(opts.inner_parameters)
    key = next((k for k in (method.scale, *_aliases(method, method.scale)) if k in params), method.scale)
    params[key] = float(params.get(key, _default(method, method.scale))) * scale
    return merge_state_dicts(
        opts.inner_method,
        list(models),
        dict(base),
        parameters=params,
        model_parameters=[dict(opts.inner_model_parameters) for _ in models],
        seed=seed,
    )


def _aliases(method: Any, field: str) -> tuple[str, ...]:
    f = method.params.model_fields.get(field)
    return (f.alias,) if f is not None and f.alias else ()


def _default(method: Any, field: str) -> float:
    for name, f in method.params.model_fields.items():
        if field in (name, f.alias):
            return float(f.default)
    return 1.0


def run_in_worker(worker: TrialWorker, payload: dict[str, Any], report: Callable[[dict[str, Any]], Any]) -> None:
    """Frank–Wolfe on the worker's resident experts. ``payload``: ``options``, ``seed``, ``budget``
    (iterations), ``replay`` (logged iterations by key) and ``out`` (the search folder)."""
    opts = FwOptions.model_validate(payload["options"])
    replay: Mapping[str, Mapping[str, Any]] = payload.get("replay", {})
    seed = int(payload["seed"])
    session = worker.session
    objective = worker.objective
    if not hasattr(objective, "gradient"):
        raise OptionError(f"--algorithm fw needs an objective with a gradient; {worker.spec.objective} has none")
    names = session.merged_names()
    base = session.base_tensors()
    experts = [session.expert_tensors(i) for i in range(len(session.experts))]
    if not experts:
        raise RecipeError("fw needs at least one expert")
    theta = inner_merge(opts, base, experts, 1.0, seed)
    theta = {n: theta[n].to(base[n].dtype) for n in names}
    pool: list[Mapping[str, Tensor]] = list(experts)
    labels = list(session.experts)
    if opts.include_initial:
        pool.append({n: t.clone() for n, t in theta.items()})
        labels.append("initial")
    iterations = min(opts.max_iters, int(payload["budget"]))
    for t in range(iterations):
        key = f"fw/{t}"
        gamma = step_size(t, opts.step_size)
        hit = replay.get(key)
        t0 = time.perf_counter()
        if hit is not None:
            choice = {n: int(k) for n, k in hit["choices"].items()}
            loss = float(hit["loss"])
        else:
            with torch.enable_grad():
                loss, grads = objective.gradient(session.assemble(theta))
            live = [n for n in names if n in grads]
            if not live:
                raise OptionError("the objective's gradient holds none of the merged tensors")
            choice = dict.fromkeys(names, KEEP)
            choice.update(
                lmo({n: grads[n] for n in live}, pool, zero_fallback=opts.zero_fallback, granularity=opts.granularity)
            )
        t1 = time.perf_counter()
        s = target(choice, pool, theta)
        stepped = inner_merge(opts, theta, [s], gamma, seed)
        theta = {n: stepped[n].to(base[n].dtype) for n in names}
        t2 = time.perf_counter()
        if hit is not None:
            continue
        record: dict[str, Any] = {
            "key": key,
            "algorithm": "fw",
            "iteration": t,
            "step": gamma,
            "loss": loss,
            "choices": choice,
            "chosen": {lab: sum(1 for k in choice.values() if k == i) for i, lab in enumerate(labels)}
            | {
                "zeros": sum(1 for k in choice.values() if k == ZERO),
                "kept": sum(1 for k in choice.values() if k == KEEP),
            },
            "gradient_seconds": round(t1 - t0, 4),
            "merge_seconds": round(t2 - t1, 4),
            "worker": worker.where,
        }
        if opts.score_each:
            t3 = time.perf_counter()
            scores = worker.score(session.assemble(theta))
            record.update(
                {"scores": scores.to_dict(), "score": scores.score, "eval_seconds": round(time.perf_counter() - t3, 4)}
            )
        else:
            record.update({"score": -loss, "scores": {"score": -loss, "tasks": {}, "metrics": {}, "kinds": {}}})
        record["seconds"] = round(time.perf_counter() - t0, 4)
        report(record)
    from mergelab.search.evolver import _save, _write_json

    out = Path(payload["out"]) / "fw"
    path = out / "merged.safetensors"
    try:
        _save(session.assemble(theta), path)
    except OutputError:
        raise
    _write_json({"model": str(path), "iterations": iterations, "pool": labels}, out / "result.json")
