"""The LM leaderboard with the zoo's LoRA experts: ``mergelab bench --suite lm --experts adapters``.

Same protocol and writer as :func:`mergelab_bench.eval.lm_bench.run_lm_bench` (grids on validation,
test scoring, bootstrap intervals, the paired comparison with ``task_arithmetic``, merge seeds,
``--update``), through the same runner (:func:`mergelab_bench.eval.lm_bench.run_lm_suite`), with
what the experts are changed:

* **experts**: each domain's PEFT LoRA expert of an LM zoo built with ``--adapters``
  (``LMZoo.adapter_path``); its own scores (``adapter:<task>``) are the normalizer of the domain,
  so 100 % means "as good as the domain's LoRA expert" (:class:`AdapterExpertsEvaluator`);
* **reference rows**: the base, every LoRA expert on every domain and, for comparison, every
  full fine-tune on every domain (``full expert: <task>``, normalized by the LoRA experts too);
* **dense rows** (any registered method: ``task_arithmetic``, ``ties``, ``tsv_m``, ...): the
  experts merged are the materialised adapters ``W0 + s·B·A`` (:func:`materialise_adapter`, read
  by mergelab's adapter reader, which equals PEFT's ``merge_and_unload``), merged by
  :func:`mergelab.merge_state_dicts` exactly as full experts are;
* **adapter rows** (:class:`AdapterRow`, named ``adapter:...``): the merge is written by
  mergelab's adapter writer (a recipe whose models are the adapter folders, ``output: adapter``,
  run by :func:`mergelab.merge` into a temporary folder), loaded as base + adapter with PEFT
  (``PeftModel.from_pretrained(...).merge_and_unload()``) and scored. Each row records the written
  ``adapter_model.safetensors``'s size and rank against the dense model's size (``info``).

Adapter rows (``--methods`` names; :func:`parse_row`):

=================================  =========================================  ==================================
row                                what is written                            grid
=================================  =========================================  ==================================
``adapter:svd:<method>:r<R>``      ``<method>`` on the materialised adapters,  the method's LM grid
(or ``:e<E>``)                     then a truncated SVD per module at rank R
                                   (energy E): ``combine: svd``
``adapter:cat``                    the adapters' factors concatenated         λ (each adapter's weight is λ): the
                                   (``combine: cat``; rank Σ rᵢ)              task_arithmetic LM grid
``adapter:knots_ties``,            KnOTS (``combine: knots_ties`` /           ``scale`` × ``density`` /
``adapter:knots_dare_ties``        ``knots_dare_ties``)                       ``scale`` × ``dare_density``
``adapter:core_space:<method>``    Core Space, cores merged by ``<method>``   the method's LM grid
=================================  =========================================  ==================================

``adapter:cat`` at λ is exactly ``task_arithmetic`` at λ on the materialised adapters:
A = [λs₁A₁; …; λs_TA_T], B = [B₁ … B_T] gives B·A = λ Σ sᵢBᵢAᵢ (up to float rounding; the cat row
is the dense TA row written as a rank-Σrᵢ adapter). ``adapter:core_space:task_arithmetic`` is TA
too (Core Space is lossless with a linear method).

Each grid point of an adapter row writes and loads an adapter: its ``merge s`` includes the
writing and PEFT's loading (both recorded apart in the row's ``info["adapter"]``).
Data-informed methods are not on this leaderboard (their data phase runs the zoo's full experts).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab_bench.eval.data_informed import BenchCalibration
from mergelab_bench.eval.grids import GridPoint, product
from mergelab_bench.eval.leaderboard import Leaderboard, registered_method
from mergelab_bench.eval.lm_bench import DEFAULT_LM_VALIDATION_LIMIT, LM_SUITE, lm_grid_for, run_lm_suite
from mergelab_bench.eval.lm_harness import Limit, LMEvaluator
from mergelab_bench.eval.stats import StatsConfig
from mergelab_bench.zoo.build import ZooError
from mergelab_bench.zoo.cache import read_json
from mergelab_bench.zoo.lm.build import ADAPTER_PREFIX, LMZoo, load_adapter_model
from mergelab_bench.zoo.lm.scorer import Scores

ROW_PREFIX = "adapter:"
"""Leaderboard rows whose merge is written as one LoRA adapter (:class:`AdapterRow`)."""

ADAPTER_BENCH_METHODS: tuple[str, ...] = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "tsv_m",
    "adapter:cat",
    "adapter:svd:task_arithmetic:r16",
    "adapter:svd:ties:r16",
    "adapter:knots_ties",
    "adapter:core_space:ties",
)
"""The rows of ``mergelab bench --suite lm --experts adapters`` when ``--methods`` is not given:
dense merges of the materialised adapters, then merges written as adapters."""

KNOTS_GRIDS: dict[str, tuple[GridPoint, ...]] = {
    "knots_ties": product({"scale": (0.6, 1.0, 1.5), "density": (0.2, 0.5)}),
    "knots_dare_ties": product({"scale": (0.7, 1.0, 1.5), "dare_density": (0.5, 0.9)}),
}
"""KnOTS's LM grids: its one scale λ around the reference configs' (0.6 with TIES, 0.7 with DARE)
and above them (the merged sV is a disjoint mean, like TIES's, whose LM grid starts at λ = 1),
times the model-wide TIES density (reference 0.2) or DARE's keep probability (reference 0.9)."""

_ROW = re.compile(
    r"^adapter:(?:(?P<simple>cat|knots_ties|knots_dare_ties)|core_space:(?P<core>[\w.]+)"
    r"|svd:(?P<svd>[\w.]+):(?:r(?P<rank>\d+)|e(?P<energy>\d*\.?\d+)))$"
)
ROW_FORMS = (
    "adapter:svd:<method>:r<rank>, adapter:svd:<method>:e<energy>, adapter:cat, adapter:knots_ties, "
    "adapter:knots_dare_ties, adapter:core_space:<method>"
)


@dataclass(frozen=True)
class AdapterRow:
    """A leaderboard row whose merge is written as one LoRA adapter of the base.

    ``rule``: the adapter writer's ``combine`` rule; ``method``: the registered method the row
    merges with (``svd``: on the products; ``core_space``: on the core matrices; ``cat``:
    ``task_arithmetic``, whose λ its grid searches; KnOTS: ``ties``, the merge it runs in its own
    basis); ``rank`` / ``energy``: the truncation of ``svd`` rows.
    """

    name: str
    rule: str
    method: str
    rank: int | None = None
    energy: float | None = None

    @property
    def label(self) -> str:
        """The name shown on the leaderboard (``ties → adapter (svd r16)``, ``adapter cat``, ...)."""
        if self.rule == "svd":
            cut = f"r{self.rank}" if self.rank is not None else f"energy {self.energy:g}"
            return f"{self.method} → adapter (svd {cut})"
        if self.rule == "core_space":
            return f"adapter core_space ({self.method})"
        return f"adapter {self.rule}"

    def grid(self) -> tuple[GridPoint, ...]:
        """The row's LM grid (see the table in the module docstring)."""
        if self.rule in KNOTS_GRIDS:
            return KNOTS_GRIDS[self.rule]
        return lm_grid_for(self.method)

    def spec(self) -> Any:
        """The method spec :func:`mergelab_bench.eval.leaderboard.run_suite` runs for this row: the
        registered method's, named after the row (so the merge function sees the row), with KnOTS's
        parameter models and random flag for KnOTS rows."""
        from mergelab.lora.combine import get_rule
        from mergelab.methods.base import MethodParams

        spec = dataclasses.replace(registered_method(self.method), name=self.name)
        if self.rule in KNOTS_GRIDS:
            card = dataclasses.replace(spec.card, random=self.rule == "knots_dare_ties")
            spec = dataclasses.replace(spec, params=get_rule(self.rule).params, model_params=MethodParams, card=card)
        return spec


def parse_row(row: str) -> AdapterRow | None:
    """The :class:`AdapterRow` of an ``adapter:...`` row name, ``None`` for any other row (a dense
    merge of the materialised adapters). A malformed ``adapter:`` name, an unknown method, or a
    method that cannot run on the adapters (routed, data-informed) is a one-line ``ValueError``."""
    if not row.startswith(ROW_PREFIX):
        return None
    m = _ROW.match(row)
    if m is None:
        raise ValueError(f"unknown adapter row {row!r}: use one of {ROW_FORMS}")
    if m["simple"]:
        method = "ties" if m["simple"].startswith("knots") else "task_arithmetic"
        out = AdapterRow(row, m["simple"], method)
    elif m["core"]:
        out = AdapterRow(row, "core_space", m["core"])
    else:
        rank = int(m["rank"]) if m["rank"] else None
        energy = float(m["energy"]) if m["energy"] else None
        if (rank is not None and rank < 1) or (energy is not None and not 0 < energy <= 1):
            raise ValueError(f"adapter row {row!r}: the rank must be ≥ 1 and the energy in (0, 1]")
        out = AdapterRow(row, "svd", m["svd"], rank=rank, energy=energy)
    spec = registered_method(out.method)  # an unknown method: the registry's one-line error
    if spec.outputs != "model" or spec.statistics is not None:
        raise ValueError(f"adapter row {row!r}: {out.method} is routed or data-informed; pick a data-free method")
    if out.rule == "svd" and spec.base == "ignored":
        raise ValueError(
            f"adapter row {row!r}: {out.method} ignores the base, so its merge is no update of the base; "
            "use task_arithmetic (the same weighted sum over the base)"
        )
    return out


def check_rows(rows: Sequence[str]) -> list[str]:
    """``rows`` checked for the adapter-expert leaderboard (a one-line ``ValueError`` otherwise):
    adapter rows parse, other rows are data-free registered methods (routed ones are skipped by
    the LM suite with a reason)."""
    for row in rows:
        if parse_row(row) is None and registered_method(row).statistics is not None:
            raise ValueError(
                f"{row} is data-informed: its data phase runs the zoo's full experts, not the LoRA experts; "
                "it is not on the adapter-expert leaderboard"
            )
    return list(rows)


def adapter_grid_for(row: str) -> tuple[GridPoint, ...]:
    """The grid of a row of the adapter-expert leaderboard (dense rows: the LM suite's)."""
    parsed = parse_row(row)
    return lm_grid_for(row) if parsed is None else parsed.grid()


def adapter_method_for(row: str) -> Any:
    """The method spec of a row of the adapter-expert leaderboard (:meth:`AdapterRow.spec`)."""
    parsed = parse_row(row)
    return registered_method(row) if parsed is None else parsed.spec()


ADAPTER_LM_SUITE = dataclasses.replace(
    LM_SUITE, grid_for=adapter_grid_for, method_for=adapter_method_for, work_prefix="mergelab-lora-bench-"
)
"""The LM suite with the adapter rows (:func:`run_adapter_bench`)."""


# --------------------------------------------------------------------------------------------
# The LoRA experts


class AdapterExpertsEvaluator(LMEvaluator):
    """An :class:`LMEvaluator` whose domain expert is the domain's LoRA expert (``adapter:<task>``):
    the normalizer of every score, of the experts' per-row results and of the bootstrap."""

    def expert_scores(self, task: str) -> Scores:
        return self.zoo.zoo_scores(ADAPTER_PREFIX + task, task, self.split, self.limit)


def check_adapter_zoo(zoo: LMZoo) -> None:
    """A one-line :class:`ZooError` unless every domain of ``zoo`` has a LoRA expert."""
    missing = [t for t in zoo.tasks if t not in zoo.adapter_tasks]
    if missing:
        raise ZooError(
            f"LM zoo {zoo.name} has no LoRA expert for {', '.join(missing)}: build it with "
            "`mergelab zoo build --suite lm --adapters` (same preset and options) before --experts adapters"
        )


def materialise(base_dir: str | os.PathLike[str], adapter: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The full state dict of the base in ``base_dir`` + the PEFT adapter folder ``adapter``:
    ``W0 + s·B·A`` per LoRA'd tensor (float32), the adapter's whole tensors and bias updates, the
    base's everywhere else, read by mergelab's adapter reader (:class:`mergelab.lora.reader.AdapterReader`,
    equal to PEFT's ``merge_and_unload``)."""
    from mergelab.checkpoint.reader import open_checkpoint

    base = open_checkpoint(os.fspath(base_dir))
    try:
        reader = open_checkpoint(os.fspath(adapter), base=base)
        try:
            return {name: reader.read(name) for name in reader.tensors()}
        finally:
            reader.close()
    finally:
        base.close()


def materialise_adapter(zoo: LMZoo, task: str) -> dict[str, torch.Tensor]:
    """Base + ``task``'s LoRA expert as a full state dict (:func:`materialise`)."""
    return materialise(zoo.base_dir, zoo.adapter_path(task))


def dense_bytes(zoo: LMZoo) -> int:
    """Bytes of the base's weight files: the size of one dense merge output."""
    return sum(f.stat().st_size for f in Path(zoo.base_dir).glob("*.safetensors"))


def lora_settings(zoo: LMZoo) -> dict[str, Any]:
    """The LoRA experts' settings (the zoo config's ``adapters``) and per-domain cost (their records)."""
    keys = (
        "training", "trainable_parameters", "train_seconds", "steps_per_second", "train_sequences_seen",
        "adapter_bytes", "expert_bytes_float32", "peak_rss_mb_process", "device",
    )  # fmt: skip
    per_domain = {}
    for t in zoo.tasks:
        rec = read_json(zoo.adapter_dir(t) / "record.json")
        per_domain[t] = {k: rec[k] for k in keys if k in rec}
        per_domain[t]["steps"] = rec.get("train_config", {}).get("steps")
        per_domain[t]["lr"] = rec.get("train_config", {}).get("lr")
    return {
        "settings": zoo.manifest.get("config", {}).get("adapters"),
        "train_seconds_total": zoo.manifest.get("adapter_train_seconds_total"),
        "domains": per_domain,
    }


# --------------------------------------------------------------------------------------------
# The merge function: dense rows in memory, adapter rows through the adapter writer


class AdapterMerge:
    """The bench's ``merge_fn`` for the adapter-expert leaderboard.

    Called as :func:`mergelab.merge_state_dicts` is. A registered method's name merges the given
    state dicts (the materialised adapters) with it; an adapter row's name (:class:`AdapterRow`,
    which :func:`adapter_method_for` gives as the spec's name) writes the row's adapter from the
    zoo's adapter folders with :func:`mergelab.merge` into a folder under ``root``, loads base +
    adapter with PEFT, removes the folder and returns the loaded model. What each adapter point
    wrote is kept in :attr:`written` (by row and point) for :meth:`annotate`.
    """

    def __init__(self, zoo: LMZoo, root: Path) -> None:
        self.zoo = zoo
        self.root = Path(root)
        self.dense_bytes = dense_bytes(zoo)
        self.written: dict[tuple[str, str], dict[str, Any]] = {}
        self._count = 0

    @staticmethod
    def point_key(parameters: Mapping[str, Any], model_parameters: Mapping[str, Any], seed: int) -> str:
        return json.dumps([dict(parameters), dict(model_parameters), seed], sort_keys=True, default=str)

    def __call__(
        self,
        name: str,
        experts: Sequence[Mapping[str, torch.Tensor]],
        base: Mapping[str, torch.Tensor] | None,
        *,
        parameters: Mapping[str, Any] | None = None,
        model_parameters: Sequence[Mapping[str, Any]] | None = None,
        seed: int = 0,
        **extra: Any,
    ) -> Any:
        row = parse_row(name)
        if row is None:
            from mergelab import merge_state_dicts

            return merge_state_dicts(
                name, experts, base, parameters=parameters, model_parameters=model_parameters, seed=seed, **extra
            )
        per_model = dict((model_parameters or [{}])[0])
        return self.adapter_point(row, dict(parameters or {}), per_model, seed)

    def recipe(
        self, row: AdapterRow, parameters: Mapping[str, Any], per_model: Mapping[str, Any], seed: int
    ) -> dict[str, Any]:
        """The recipe that writes ``row``'s adapter at one grid point (see the module docstring)."""
        merge_parameters = dict(parameters)
        model_parameters = dict(per_model)
        adapter: dict[str, Any] = {"combine": row.rule}
        if row.rule == "svd":
            adapter.update(rank=row.rank, energy=row.energy)
        elif row.rule == "cat":  # cat weighs each adapter by its weight only: λ goes into the weights
            lam = float(merge_parameters.pop("lambda", 1.0))
            model_parameters["weight"] = lam * float(model_parameters.get("weight", 1.0))
        elif row.rule in KNOTS_GRIDS:  # KnOTS's parameters are the rule's; the dense path sees no change
            adapter["combine_parameters"] = {**merge_parameters, "seed": seed}
            merge_parameters = {}
        elif row.rule == "core_space":  # the cores are merged with the recipe's method and parameters
            adapter["combine_parameters"] = {"seed": seed}
        return {
            "merge_method": "task_arithmetic" if row.rule in KNOTS_GRIDS else row.method,
            "base_model": str(self.zoo.base_dir),
            "models": [
                {"model": str(self.zoo.adapter_path(t)), "parameters": dict(model_parameters)} for t in self.zoo.tasks
            ],
            "parameters": merge_parameters,
            "seed": seed,
            "defaults": "paper",
            "output": "adapter",
            "adapter": adapter,
        }

    def adapter_point(
        self, row: AdapterRow, parameters: Mapping[str, Any], per_model: Mapping[str, Any], seed: int
    ) -> torch.nn.Module:
        """Write ``row``'s adapter at one point, load base + adapter with PEFT, record the facts."""
        from mergelab import merge

        self._count += 1
        out = self.root / f"adapter-{self._count}"
        recipe = self.recipe(row, parameters, per_model, seed)
        t0 = time.perf_counter()
        result = merge(recipe, out, threads=torch.get_num_threads(), hash_inputs=False)
        t1 = time.perf_counter()
        try:
            model = load_adapter_model(self.zoo.base_dir, out, self.zoo.device)
            t2 = time.perf_counter()
            report = result.plan_summary.get("adapter", {})
            file_bytes = (out / "adapter_model.safetensors").stat().st_size
            self.written[(row.name, self.point_key(parameters, per_model, seed))] = {
                "rule": row.rule,
                "method": row.method,
                "recipe": {k: recipe[k] for k in ("merge_method", "parameters", "adapter")}
                | {"model_parameters": recipe["models"][0]["parameters"]},
                "rank": report.get("ranks", {}),
                "lora_modules": report.get("lora_modules"),
                "adapter_bytes": file_bytes,
                "adapter_tensor_bytes": report.get("adapter_bytes"),
                "dense_bytes": self.dense_bytes,
                "max_rel_error": report.get("max_rel_error") if row.rule == "svd" else None,
                "mean_rel_error": report.get("mean_rel_error") if row.rule == "svd" else None,
                "write_seconds": round(t1 - t0, 3),
                "load_seconds": round(t2 - t1, 3),
            }
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return model

    def annotate(self, lb: Leaderboard, seed: int) -> None:
        """Give every row of ``lb`` run here its ``info``: adapter rows their label, the chosen point's
        adapter (rank, bytes against the dense model's) and a note; dense rows their output size."""
        for m in lb.methods:
            row = parse_row(m.method)
            if row is None:
                m.info = {"output": "dense", "dense_bytes": self.dense_bytes}
                continue
            m.info = {"label": row.label, "output": "adapter"}
            if m.chosen is None:
                continue
            facts = self.written.get((m.method, self.point_key(m.chosen.parameters, m.chosen.model_parameters, seed)))
            if facts is None:
                continue
            m.info["adapter"] = facts
            m.info["note"] = adapter_note(facts)


def fmt_bytes(n: int) -> str:
    """``12.3 MB``, ``538 MB``, ``14.8 kB``: decimal units, three significant digits."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n} B"


def adapter_note(facts: Mapping[str, Any]) -> str:
    """One line about an adapter row's chosen point: rank, size against the dense model, timings."""
    ranks = facts.get("rank") or {}
    lo, hi = ranks.get("min"), ranks.get("max")
    rank = f"rank {lo}" if lo == hi else f"rank {lo}–{hi}"
    size, dense = facts["adapter_bytes"], facts["dense_bytes"]
    err = facts.get("mean_rel_error")
    text = (
        f"{rank} over {facts.get('lora_modules')} modules, adapter {fmt_bytes(size)} "
        f"({100 * size / dense:.2f} % of the dense {fmt_bytes(dense)})"
    )
    if err is not None:
        text += f", mean relative error of the SVD {err:.3g}"
    return text + f"; written in {facts['write_seconds']:.1f} s, loaded with PEFT in {facts['load_seconds']:.1f} s"


# --------------------------------------------------------------------------------------------
# The run


def run_adapter_bench(
    zoo: LMZoo,
    *,
    methods: Sequence[str] | None = None,
    validation_limit: int | None = DEFAULT_LM_VALIDATION_LIMIT,
    test_limit: Limit = "zoo",
    seed: int = 0,
    grids: Mapping[str, Sequence[GridPoint]] | None = None,
    progress=None,
    echo: Callable[[str], None] | None = None,
    calibration: BenchCalibration | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    stats: StatsConfig | None = None,
    full_references: bool = True,
) -> Leaderboard:
    """The LM leaderboard of ``zoo``'s LoRA experts (see the module docstring).

    Arguments as :func:`mergelab_bench.eval.lm_bench.run_lm_bench` (``methods`` default:
    :data:`ADAPTER_BENCH_METHODS`); ``full_references`` adds the full fine-tunes as reference rows
    (their scores on other domains are cached in the zoo once scored, e.g. by ``--experts full``).
    Adapter merges are written under ``work_dir`` (or a temporary folder), each removed once loaded.
    The leaderboard's config records ``experts: adapters`` and the LoRA experts' settings and cost.
    """
    check_adapter_zoo(zoo)
    rows = check_rows(list(methods or ADAPTER_BENCH_METHODS))
    t_start = time.perf_counter()
    references = [("base", "base", "pretrained")]
    references += [(f"{ADAPTER_PREFIX}{t}", f"LoRA expert: {t}", "expert") for t in zoo.tasks]
    if full_references:
        references += [(f"expert:{t}", f"full expert: {t}", "full expert") for t in zoo.tasks]
    parent = Path(work_dir) if work_dir is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".adapter-merges-", dir=parent) as tmp:
        merger = AdapterMerge(zoo, Path(tmp))
        lb = run_lm_suite(
            ADAPTER_LM_SUITE, zoo,
            val=AdapterExpertsEvaluator(zoo, split="validation", limit=validation_limit),
            test=AdapterExpertsEvaluator(zoo, split="test", limit=test_limit),
            reference_models=references,
            load_experts=lambda: [materialise_adapter(zoo, t) for t in zoo.tasks],
            methods=rows, validation_limit=validation_limit, seed=seed, grids=grids, merge_fn=merger,
            progress=progress, echo=echo, calibration=calibration, work_dir=work_dir, stats=stats, t_start=t_start,
        )  # fmt: skip
    merger.annotate(lb, seed)
    lb.config["experts"] = "adapters"
    lb.config["lora"] = lora_settings(zoo)
    lb.info["notes"] = adapter_notes(lb, merger.dense_bytes)
    return lb


def adapter_notes(lb: Leaderboard, dense: int) -> list[str]:
    """The markdown paragraphs of an adapter-expert leaderboard (:func:`mergelab_bench.eval.leaderboard.markdown`)."""
    s = (lb.config.get("lora") or {}).get("settings") or {}
    lora = (
        f"rank {s.get('rank')}, alpha {s.get('alpha')}, lr {s.get('lr')}, on {', '.join(s.get('target_modules') or [])}"
        if s
        else "settings in leaderboard.json"
    )
    return [
        "Experts: the zoo's LoRA experts (" + lora + "; trained with peft); each domain's "
        "normalized score is against its LoRA expert (100 = as good as the domain's LoRA expert), the reference "
        "rows `full expert: <task>` are the full fine-tunes scored the same way. Dense rows merge the "
        "materialised adapters W0 + s·B·A and output a dense model "
        f"({fmt_bytes(dense)}); `adapter ...` rows output one PEFT LoRA adapter of the base, written by "
        "mergelab (`output: adapter`) and scored as base + adapter loaded with PEFT (their `merge s` includes "
        "writing and loading). `adapter cat` at λ is exactly task_arithmetic at λ (the adapters' factors "
        "concatenated with weights λ·sᵢ, rank Σ rᵢ); `→ adapter (svd rR)` rows are the method's dense merge cut "
        "to rank R per module by an SVD. Adapter sizes at the chosen points:",
    ]


__all__ = [
    "ADAPTER_BENCH_METHODS",
    "ADAPTER_LM_SUITE",
    "AdapterExpertsEvaluator",
    "AdapterMerge",
    "AdapterRow",
    "adapter_grid_for",
    "adapter_method_for",
    "check_adapter_zoo",
    "check_rows",
    "materialise",
    "materialise_adapter",
    "parse_row",
    "run_adapter_bench",
]
