"""The set-up the bench's commands and the scripts in ``benchmarks/`` share: torch threads, quiet
transformers, a built zoo of either suite, the closing line of a script."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def set_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)`` when ``threads`` > 0 (0 or less: torch's default)."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def quiet_transformers() -> None:
    """Hide transformers' per-load progress bars and warnings (ours are shown instead)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def load_suite_zoo(
    suite: str, spec: str | os.PathLike[str], *, cache: str | os.PathLike[str] | None = None, device: str | None = None
) -> Any:
    """The built zoo ``spec`` (preset name, folder or manifest) of ``suite``: ``lm`` (an ``LMZoo``, its models
    on ``device``) or ``classification`` (a ``Zoo``)."""
    if suite == "lm":
        from mergelab_bench.zoo.lm.build import load_lm_zoo

        return load_lm_zoo(spec, cache=cache, device=device)
    from mergelab_bench.zoo.build import load_zoo

    return load_zoo(spec, cache=cache)


def done_line(t0: float, paths: Mapping[str, Path]) -> str:
    """``done in 12 s; wrote a.json, a.md``: a benchmark script's last line (``t0``: its ``perf_counter`` start)."""
    return f"done in {time.perf_counter() - t0:.0f} s; wrote " + ", ".join(str(p) for p in paths.values())
