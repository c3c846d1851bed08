"""Router rows: each expert's training and model-selection examples, read through the core's
calibration sources (``mergelab.data``; ``zoo:<task>[:<split>]`` comes from the benchmark's plugin).

Train rows are the first ``train_examples`` of the expert's ``calibration`` source; validation
rows are the first ``validation_examples`` of its ``validation`` source or, without one, held out
from the calibration source as the reference holds out 10 % before taking up to 5,500 train rows:
up to ⌈train_examples / (1 − validation_fraction)⌉ rows are read, the last ``validation_fraction``
of them (at least one, and whatever lies past the first ``train_examples``) validate and the
others train (:func:`hold_out`). A source
that is a ``test`` split (a zoo source with ``split: test``, a file named ``test.*``) is refused:
router training and model selection never see test rows. The ids of every row used are
returned (and written to ``router/router_data.json``), so a caller can check that.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.data.config import CalibrationSource
from mergelab.data.sources import Examples, load_examples
from mergelab.errors import RecipeError
from mergelab.routed.settings import RouterSettings


@dataclass
class RouterRows:
    """One expert's rows for one purpose (train or validation)."""

    texts: list[str]
    ids: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.texts)


@dataclass
class ExpertRows:
    """Train and validation rows of one expert (route)."""

    name: str
    train: RouterRows
    validation: RouterRows
    notes: list[str] = field(default_factory=list)


@dataclass
class RouterData:
    """Router rows given from Python instead of the recipe's sources (texts per expert)."""

    train: Sequence[str]
    validation: Sequence[str] | None = None
    train_ids: Sequence[str] | None = None
    validation_ids: Sequence[str] | None = None


def is_test_source(source: CalibrationSource) -> bool:
    if source.zoo_task is not None:
        return source.split == "test"
    return source.path is not None and Path(source.path).name.split(".")[0].lower() == "test"


def check_router_source(source: CalibrationSource | None, label: str, what: str = "calibration") -> None:
    """Refuse a missing source or a test split, in one line."""
    if source is None:
        raise RecipeError(
            f"model {label}: a router needs training rows: give the model a `calibration:` source (its task's train "
            "split, e.g. zoo:<task>:train or a JSONL file) or pass router_data from Python"
        )
    if is_test_source(source):
        raise RecipeError(
            f"model {label}: the router's {what} source {source.describe()} is a test split; routers are trained "
            "and selected on train/validation rows only"
        )


def _rows(ex: Examples, source: CalibrationSource, start: int = 0, stop: int | None = None) -> RouterRows:
    ids = ex.ids or [f"{source.describe()}#{i}" for i in range(len(ex.texts))]
    return RouterRows(list(ex.texts[start:stop]), list(ids[start:stop]), source.describe())


def expert_rows(
    names: Sequence[str],
    labels: Sequence[str],
    sources: Sequence[CalibrationSource | None],
    validation: Sequence[CalibrationSource | None],
    settings: RouterSettings,
    python: Sequence[RouterData | None] | None = None,
) -> list[ExpertRows]:
    """Every expert's rows (see the module docstring)."""
    out: list[ExpertRows] = []
    for i, name in enumerate(names):
        given = python[i] if python is not None else None
        if given is not None:
            out.append(_python_rows(name, given, settings))
            continue
        src, val = sources[i], validation[i]
        check_router_source(src, labels[i])
        assert src is not None
        if val is not None:
            check_router_source(val, labels[i], "validation")
            train_ex = load_examples(src, settings.train_examples)
            val_ex = load_examples(val, settings.validation_examples)
            rows = ExpertRows(name, _rows(train_ex, src), _rows(val_ex, val))
        else:
            ex = load_examples(src, read_limit(settings))
            cut = hold_out(len(ex.texts), settings)
            if cut < 1:
                raise RecipeError(
                    f"model {labels[i]}: {len(ex.texts)} router rows in {src.describe()}: too few to hold out "
                    "validation rows; give a `validation:` source or more rows"
                )
            rows = ExpertRows(name, _rows(ex, src, 0, cut), _rows(ex, src, cut, None))
            rows.notes.append(
                f"validation: the last {len(ex.texts) - cut} of {len(ex.texts)} rows of {src.describe()} (held out)"
            )
        overlap = set(rows.train.ids) & set(rows.validation.ids)
        if overlap and val is not None:
            raise RecipeError(
                f"model {labels[i]}: {len(overlap)} rows are both in the router's train and validation sources "
                f"(e.g. {sorted(overlap)[0]!r}); give disjoint splits"
            )
        out.append(rows)
    return out


def read_limit(settings: RouterSettings) -> int:
    """Rows read from a calibration source without a validation source: ⌈train / (1 − fraction)⌉."""
    return math.ceil(settings.train_examples / (1.0 - settings.validation_fraction) - 1e-9)


def hold_out(n: int, settings: RouterSettings) -> int:
    """Of ``n`` rows read, how many train (the first ones): at most ``train_examples``, and at least
    ``validation_fraction`` of them (rounded, at least one) held out; the rest validate."""
    n_val = max(1, round(settings.validation_fraction * n))
    return max(0, min(settings.train_examples, n - n_val))


def _python_rows(name: str, given: RouterData, settings: RouterSettings) -> ExpertRows:
    if given.validation is not None:
        train = list(given.train)[: settings.train_examples]
        tids = list(given.train_ids or [f"{name}:train:{i}" for i in range(len(train))])[: len(train)]
        val = list(given.validation)[: settings.validation_examples]
        vids = list(given.validation_ids or [f"{name}:validation:{i}" for i in range(len(val))])[: len(val)]
        return ExpertRows(name, RouterRows(train, tids, "python"), RouterRows(val, vids, "python"))
    train = list(given.train)[: read_limit(settings)]
    tids = list(given.train_ids or [f"{name}:train:{i}" for i in range(len(train))])[: len(train)]
    cut = hold_out(len(train), settings)
    if cut < 1:
        raise RecipeError(f"router data of {name}: {len(train)} rows are too few to hold out validation rows")
    return ExpertRows(
        name, RouterRows(train[:cut], tids[:cut], "python"), RouterRows(train[cut:], tids[cut:], "python (held out)")
    )


def rows_record(rows: Sequence[ExpertRows]) -> dict[str, Any]:
    """``router_data.json``: the sources and ids of every row the router saw."""
    return {
        "experts": [
            {
                "name": r.name,
                "train": {"source": r.train.source, "rows": len(r.train), "ids": r.train.ids},
                "validation": {"source": r.validation.source, "rows": len(r.validation), "ids": r.validation.ids},
                "notes": r.notes,
            }
            for r in rows
        ]
    }
