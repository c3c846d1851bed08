"""Routed rows *without* the task id: Twin-Merging, Split-Merge, SMILE, WEMoE, and TALL masks / EMR
with a router, on both suites.

Each grid point is built exactly as ``mergelab merge`` builds it (:func:`mergelab.merge`: a
routed-model folder, or a TALL/EMR output with ``routed/router/``) and loaded with
:class:`mergelab.routed.RoutedModel`; every test row is then scored the way a deployed model
would run it, with no task id anywhere:

* **router data.** Sequence routers (Twin-Merging, Split-Merge, routed TALL/EMR) train on the first
  ``train_examples`` rows of each task's **train** split and keep the epoch with the best accuracy
  on the first ``validation_examples`` rows of its **validation** split (the grid search reads the
  same split); never test rows. This departs from the reference (and from mergelab's defaults) to
  stay cheap on CPU: 300 train rows per task instead of up to 5,500, 100 selection rows instead of
  1,000, and a batch of ⌈rows / 8⌉ (at most the reference's 1024) so that every epoch takes about 8
  Adam steps (batch 1024 on a few hundred rows per task would take one); the manifest records
  the steps. WEMoE's gates learn by entropy minimisation on unlabeled inputs as
  in its paper: by default the task's **test** inputs without labels (``wemoe_split``), as the
  bench does for AdaMerging; the row is marked with it. SMILE is not trained;
* **classification** (both zoo variants): the routed model runs each row once; its route is the
  argmax of the routing weights (the sequence router's, or for SMILE / WEMoE the mean of the layers'
  weights); the row is predicted with **the routed task's head** (the head belongs to the task:
  choosing it is part of routing), so a row routed to another task counts as wrong. The score with
  the true task's head ("oracle head") is recorded beside it for comparison, never as the headline;
* **LM suite**: the routed model is scored as any model (perplexity, exact match with ``generate``);
  there is no head to choose;
* recorded per row: the router's accuracy on the test rows (argmax route = the row's task), the
  storage (shared + adapters + router against N experts, from the manifest), and the throughput of
  the routed model against the plain shared model on one batch of mixed tasks.
"""

from __future__ import annotations

import shutil
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.methods.base import MethodCard, NoParams
from mergelab_bench.eval.grids import ROUTED_ROWS, GridPoint
from mergelab_bench.eval.metrics import EvalReport


@dataclass(frozen=True)
class RoutedRowSpec:
    """What the leaderboard runner reads of a row's method (as of a registered method's spec)."""

    name: str
    method: str
    params: Any
    model_params: Any = NoParams
    outputs: str = "routed_model"
    statistics: str | None = None
    base: str = "required"
    min_experts: int = 1
    max_experts: int | None = None
    card: MethodCard = field(default_factory=MethodCard)


def routed_row_spec(row: str) -> RoutedRowSpec | None:
    """The spec of a routed row, or None when ``row`` is not one."""
    method = ROUTED_ROWS.get(row)
    if method is None:
        return None
    if method in ("tall_masks", "emr"):
        from mergelab.methods import get_method

        reg = get_method(method)
        return RoutedRowSpec(row, method, reg.params, reg.model_params, min_experts=2)
    from mergelab.routed.build import ROUTED_METHODS

    return RoutedRowSpec(row, method, ROUTED_METHODS[method].params)


@dataclass(frozen=True)
class RoutedBenchSettings:
    """Data and training of the routed rows (recorded in the leaderboard's config)."""

    train_examples: int = 300
    """router rows per task: the first rows of its train split."""
    validation_examples: int = 100
    """router model-selection rows per task: the first rows of its validation split."""
    epochs: int = 50
    """router epochs (Twin-Merging's)."""
    router_batch_size: int | None = None
    """router batch; None: ⌈train_examples × tasks / 8⌉, at most 1024 (about 8 Adam steps per epoch)."""
    wemoe_split: str = "test"
    """WEMoE's unlabeled inputs: ``test`` (its paper's test-time adaptation) or ``train``."""
    wemoe_examples: int = 1000
    """WEMoE: unlabeled inputs per task."""
    wemoe_steps: int = 1000
    """WEMoE: Adam steps (the paper's 1000 on CLIP)."""
    device: str = "cpu"
    """torch device of the builds (router features, WEMoE's gates)."""
    throughput_rows: int = 16
    """rows per task in the mixed batch of the throughput measure."""

    def __post_init__(self) -> None:
        from mergelab.errors import RecipeError

        for f in ("train_examples", "validation_examples", "epochs", "wemoe_examples", "throughput_rows"):
            if getattr(self, f) < 1:
                raise RecipeError(f"routed {f.replace('_', ' ')} must be at least 1")
        if self.router_batch_size is not None and self.router_batch_size < 2:
            raise RecipeError("routed router batch size must be at least 2 (BatchNorm)")
        if self.wemoe_steps < 0:
            raise RecipeError("routed wemoe steps must be at least 0")
        if self.wemoe_split not in ("test", "train"):
            raise RecipeError(f"wemoe split must be test or train, not {self.wemoe_split!r}")

    def describe(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "router_rows": "first train_examples rows of each task's train split; selection on the first "
            "validation_examples rows of its validation split; never test rows",
            "router_batch": "router_batch_size, or ceil(train_examples x tasks / 8) capped at 1024: about 8 Adam "
            "steps per epoch (the reference: batch 1024 on up to 5,500 rows per task; the manifest records the steps)",
            "wemoe_rows": f"first {self.wemoe_examples} inputs of each task's {self.wemoe_split} split, labels never "
            "read (test-time adaptation as in the WEMoE paper)",
            "evaluation": "no task id: each row routed by the model; classification rows are predicted with the "
            "routed task's head (a wrong route scores 0); the true task's head is recorded as oracle_head",
        }


# --------------------------------------------------------------------------------------------
# building one grid point


def _is_lm(zoo: Any) -> bool:
    from mergelab_bench.zoo.lm.build import LMZoo

    return isinstance(zoo, LMZoo)


def _sources(zoo: Any, task: str, split: str, limit: int, head: bool = False) -> dict[str, Any]:
    if _is_lm(zoo):
        return {"path": str(zoo.data(task).path / f"{split}.jsonl"), "num_examples": limit}
    src: dict[str, Any] = {"zoo_task": task, "zoo": str(zoo.manifest_path), "split": split, "num_examples": limit}
    if head:
        src["head"] = "zoo"
    return src


def router_batch(settings: RoutedBenchSettings, tasks: int) -> int:
    """The router batch of the bench (see :class:`RoutedBenchSettings`)."""
    if settings.router_batch_size is not None:
        return settings.router_batch_size
    return max(2, min(1024, -(-settings.train_examples * tasks // 8)))


def routed_model_recipe(
    spec: RoutedRowSpec, zoo: Any, point: GridPoint, settings: RoutedBenchSettings, seed: int
) -> dict[str, Any]:
    """The recipe of one routed row's grid point on ``zoo`` (see the module docstring)."""
    max_len = int(zoo.eval_settings["max_len"]) if _is_lm(zoo) else int(zoo.max_len)
    models = []
    for t in zoo.tasks:
        entry: dict[str, Any] = {"model": str(zoo.expert_model_dir(t)), "name": t}
        if spec.method == "wemoe":
            entry["calibration"] = _sources(zoo, t, settings.wemoe_split, settings.wemoe_examples, head=not _is_lm(zoo))
        elif spec.method != "smile":
            entry["calibration"] = _sources(zoo, t, "train", settings.train_examples)
            entry["validation"] = _sources(zoo, t, "validation", settings.validation_examples)
        if point.model_parameters:
            entry["parameters"] = dict(point.model_parameters)
        models.append(entry)
    params = dict(point.parameters)
    if spec.method == "wemoe":
        params.setdefault("steps", settings.wemoe_steps)
        params.setdefault("examples", settings.wemoe_examples)
        params.setdefault("max_length", max_len)
    rec: dict[str, Any] = {
        "merge_method": spec.method,
        "base_model": str(zoo.base_dir),
        "models": models,
        "parameters": params,
        "seed": seed,
    }
    if spec.method not in ("smile", "wemoe"):
        rec["router"] = {
            "train_examples": settings.train_examples,
            "validation_examples": settings.validation_examples,
            "epochs": settings.epochs,
            "batch_size": router_batch(settings, len(zoo.tasks)),
            "max_length": max_len,
        }
    if not _is_lm(zoo):
        rec["calibration"] = {"model_type": "encoder"}
    return rec


def routed_model_merge(
    spec: RoutedRowSpec,
    zoo: Any,
    point: GridPoint,
    out: str | Path,
    *,
    settings: RoutedBenchSettings,
    seed: int = 0,
) -> RoutedModelMerge:
    """Build one grid point into ``out`` (as ``mergelab merge``) and wrap it for scoring."""
    from mergelab.api import merge

    result = merge(
        routed_model_recipe(spec, zoo, point, settings, seed),
        out,
        force=True,
        hash_inputs=False,
        device=settings.device,
    )
    return RoutedModelMerge(result.path, list(zoo.tasks), spec.method, settings)


def _manifest(folder: Path) -> dict[str, Any]:
    from mergelab.routed import is_bundle, read_bundle_manifest, read_manifest

    return read_bundle_manifest(folder) if is_bundle(folder) else read_manifest(folder)


@dataclass
class RoutedModelMerge:
    """A routed output on disk, scored without the task id (see the module docstring)."""

    folder: Path
    tasks: list[str]
    method: str
    settings: RoutedBenchSettings
    manifest: dict[str, Any] = field(default_factory=dict)
    router_test: dict[str, Any] | None = None
    oracle: EvalReport | None = None
    throughput: dict[str, Any] | None = None
    _model: Any = None

    def __post_init__(self) -> None:
        self.manifest = _manifest(self.folder)

    @property
    def storage(self) -> dict[str, Any]:
        return dict(self.manifest.get("storage", {}))

    def model(self) -> Any:
        if self._model is None:
            from mergelab.routed import RoutedModel

            self._model = RoutedModel.from_pretrained(self.folder).eval()
        return self._model

    # -- scoring

    def evaluate(self, evaluator: Any, name: str) -> EvalReport:
        from mergelab_bench.eval.lm_harness import LMEvaluator

        with torch.no_grad():
            if isinstance(evaluator, LMEvaluator):
                report = evaluator.evaluate(self.model(), name=name)
                routes = self._lm_routes(evaluator)
            else:
                report, routes = self._classification(evaluator, name)
        self.router_test = _route_accuracy(routes, self.tasks)
        report.info.update({"routed": True, "needs_task_id": False, "router_accuracy": self.router_test})
        return report

    def _classification(self, evaluator: Any, name: str) -> tuple[EvalReport, dict[str, torch.Tensor]]:
        from mergelab_bench.zoo.backbone import mean_pool

        model = self.model()
        zoo = evaluator.zoo
        heads = {t: zoo.head(t, "expert") for t in self.tasks}
        preds: dict[str, torch.Tensor] = {}
        oracle: dict[str, torch.Tensor] = {}
        routes: dict[str, torch.Tensor] = {}
        for task in evaluator.tasks:
            batches = zoo.batches(task, evaluator.split, evaluator.limit)
            n = sum(len(b.index) for b in batches)
            pred = torch.full((n,), -1, dtype=torch.long)
            orc = torch.empty(n, dtype=torch.long)
            route = torch.empty(n, dtype=torch.long)
            for b in batches:
                out = model(input_ids=b.input_ids, attention_mask=b.attention_mask)
                feats = mean_pool(out.last_hidden_state, b.attention_mask).float()
                r = model.last_route.argmax(-1).cpu()
                route[b.index] = r
                orc[b.index] = heads[task](feats).argmax(-1)
                own = r == self.tasks.index(task)
                if bool(own.any()):
                    pred[b.index[own]] = heads[task](feats[own]).argmax(-1)
            preds[task], oracle[task], routes[task] = pred, orc, route
        info = {"head": "routed (the argmax route's task head; a wrong route scores 0)", "limit": evaluator.limit}
        report = evaluator.report(name, preds, info)
        self.oracle = evaluator.report(f"{name} (oracle head)", oracle, {"head": "oracle (the true task's head)"})
        report.info["oracle_head_average_normalized"] = self.oracle.average_normalized
        return report, routes

    def _lm_routes(self, evaluator: Any) -> dict[str, torch.Tensor]:
        from mergelab_bench.zoo.lm.scoring import encode_texts, make_lm_batches

        model = self.model()
        scorer = evaluator.zoo.scorer
        routes: dict[str, torch.Tensor] = {}
        for task in evaluator.tasks:
            texts = evaluator.zoo.data(task).texts(evaluator.split, evaluator.limit)
            seqs = encode_texts(scorer.tokenizer, texts, max_len=scorer.max_len, doc_id=scorer.doc_id)
            got = torch.empty(len(seqs), dtype=torch.long)
            for b in make_lm_batches(seqs, batch_size=scorer.batch_size, pad_id=scorer.pad_id):
                b = b.to(model.device)
                model(input_ids=b.input_ids, attention_mask=b.attention_mask)
                got[b.index] = model.last_route.argmax(-1).cpu()
            routes[task] = got
        return routes

    def evaluate_shared(self, evaluator: Any, name: str) -> EvalReport:
        """The shared model alone (no experts), each task with its own head: for comparison."""
        from mergelab.routed import is_bundle
        from mergelab_bench.eval.harness import load_state_dict_path

        shared = self.folder / "shared" if is_bundle(self.folder) else self.folder
        return evaluator.evaluate(load_state_dict_path(shared), name=name)

    def measure_throughput(self, evaluator: Any, repeats: int = 3) -> dict[str, Any]:
        """Rows per second of the routed model and of the plain shared model on one batch of mixed tasks."""
        from mergelab.informed.modeling import detect_kind, load_model, read_config
        from mergelab.routed import is_bundle
        from mergelab_bench.eval.lm_harness import LMEvaluator

        k = self.settings.throughput_rows
        if isinstance(evaluator, LMEvaluator):
            from mergelab_bench.zoo.lm.scoring import collate, encode_texts

            scorer = evaluator.zoo.scorer
            seqs = []
            for t in self.tasks:
                seqs += encode_texts(
                    scorer.tokenizer,
                    evaluator.zoo.data(t).texts(evaluator.split, k),
                    max_len=scorer.max_len,
                    doc_id=scorer.doc_id,
                )
            b = collate(seqs, scorer.pad_id)
            ids, mask = b.input_ids, b.attention_mask
        else:
            from mergelab_bench.zoo.backbone import make_batches

            zoo = evaluator.zoo
            texts = [x for t in self.tasks for x in zoo.examples(t, evaluator.split, k)[0]]
            (b,) = make_batches(zoo.tokenizer, texts, max_len=zoo.max_len, batch_size=len(texts), sort_by_length=False)
            ids, mask = b.input_ids, b.attention_mask
        routed = self.model()
        shared_dir = self.folder / "shared" if is_bundle(self.folder) else self.folder
        plain = load_model(shared_dir, detect_kind(read_config(shared_dir)), routed.device, torch.float32)
        ids, mask = ids.to(routed.device), mask.to(routed.device)

        def timed(model: Any) -> float:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)  # warm-up
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    model(input_ids=ids, attention_mask=mask)
                    times.append(time.perf_counter() - t0)
            return statistics.median(times)

        t_routed, t_plain = timed(routed), timed(plain)
        rows = int(ids.shape[0])
        self.throughput = {
            "rows": rows,
            "tasks": len(self.tasks),
            "tokens": int(mask.sum()),
            "routed_rows_per_s": round(rows / t_routed, 2),
            "shared_rows_per_s": round(rows / t_plain, 2),
            "slowdown": round(t_routed / t_plain, 3),
            "device": str(routed.device),
            "torch_threads": torch.get_num_threads(),
            "note": "one forward of a batch mixing every task's first rows (median of "
            f"{repeats}); the routed time includes the router",
        }
        return self.throughput

    def remove(self) -> None:
        self._model = None
        shutil.rmtree(self.folder, ignore_errors=True)


def _route_accuracy(routes: Mapping[str, torch.Tensor], tasks: Sequence[str]) -> dict[str, Any]:
    per_task = {t: float((r == tasks.index(t)).float().mean()) if len(r) else None for t, r in routes.items()}
    total = sum(len(r) for r in routes.values())
    right = sum(int((r == tasks.index(t)).sum()) for t, r in routes.items())
    confusion = {t: [int((r == j).sum()) for j in range(len(tasks))] for t, r in routes.items()}
    return {"accuracy": right / total if total else None, "per_task": per_task, "confusion": confusion}


def routed_model_info(merged: RoutedModelMerge, shared_test: EvalReport | None) -> dict[str, Any]:
    """The leaderboard's record of a routed row without the task id."""
    m = merged.manifest
    router = m.get("router") or {}
    return {
        "per_task": False,
        "needs_task_id": False,
        "method": merged.method,
        "routing": m.get("routing"),
        "router_validation_accuracy": router.get("validation_accuracy"),
        "router_test_accuracy": merged.router_test,
        "router": {k: v for k, v in router.items() if k not in ("sources",)},
        "oracle_head_test_average_normalized": merged.oracle.average_normalized if merged.oracle else None,
        "storage": {k: v for k, v in merged.storage.items() if k != "note"},
        "throughput": merged.throughput,
        "shared_model_test_average_normalized": None if shared_test is None else shared_test.average_normalized,
    }
