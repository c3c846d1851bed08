#!/usr/bin/env python
"""Parity check: mergelab against mergekit on tiny random Llama checkpoints.

What it does
------------
1. Builds, in a temporary folder, a random-init ``LlamaForCausalLM`` (hidden 64, 2 layers,
   vocab 128, untied embeddings) saved with ``save_pretrained`` in float32, and three
   "fine-tunes": the base plus random deltas (a shared direction plus a private one, so task
   vectors agree in part), written as ``model.safetensors`` + ``config.json``. The third
   fine-tune leaves ``model.norm.weight`` equal to the base (a zero task vector).
2. For each recipe (linear, task_arithmetic, ties, breadcrumbs, slerp, slerp with per-filter
   layer gradients, model_stock, model_stock filter_wise, dare_linear, nuslerp with and without a
   base) writes one mergekit-format YAML (``dtype: float32``, every parameter whose default
   differs between the two tools set explicitly) and runs
   ``mergekit-yaml RECIPE OUT --random-seed 0 --no-copy-tokenizer`` (the checkpoints have no
   tokenizer) and ``mergelab merge RECIPE OUT2 --force``.
3. Compares every output tensor: max |a − b| and the fraction of elements differing by more
   than the tolerance (1e-5 absolute), and prints one row per recipe.

Exit status: 0 when every recipe expected to match does (linear, task_arithmetic, ties,
breadcrumbs, slerp, model_stock and nuslerp) and every recipe ran; 1 otherwise. Differences in
ties/breadcrumbs are excused when every differing element sits at a top-k boundary tie (an
expert's |τ| equal to the magnitude at a cut, where mergekit keeps exactly k entries and breaks
the tie by sort order while mergelab keeps all tied entries). dare_linear is only checked to run
(its random masks differ by design). Without mergekit (``--mergekit``, default ``mergekit-yaml``
beside ``$MERGEKIT_PYTHON``) the mergekit side is skipped with a message and only mergelab is run.

Usage::

    MERGEKIT_PYTHON=VENV/bin/python python benchmarks/mergekit_parity.py \
        [--mergekit PATH/TO/mergekit-yaml] [--only ties,slerp] [--keep DIR] [--verbose]

Needs torch, transformers, safetensors, PyYAML (mergelab's own dependencies) and a ``mergelab``
command on PATH (else ``python -c 'from mergelab.cli import main; main()'`` is used).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

# mergekit-yaml beside $MERGEKIT_PYTHON (a venv with mergekit 0.1.5), or --mergekit; None: not available
DEFAULT_MERGEKIT = (
    str(Path(os.environ["MERGEKIT_PYTHON"]).parent / "mergekit-yaml") if os.environ.get("MERGEKIT_PYTHON") else None
)
ATOL = 1e-5
N_FINETUNES = 3


# ----------------------------------------------------------------------------- checkpoints


StateDicts = dict[str, dict[str, torch.Tensor]]


def build_checkpoints(root: Path, seed: int = 0) -> tuple[Path, list[Path], StateDicts]:
    """Base + fine-tunes under ``root``; returns their paths and in-memory state dicts."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    base_dir = root / "base"
    model.save_pretrained(base_dir, safe_serialization=True)
    base_sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    states = {"base": base_sd}

    gen = torch.Generator().manual_seed(seed + 1)
    shared = {k: torch.randn(v.shape, generator=gen) for k, v in base_sd.items()}
    ft_dirs = []
    for i in range(N_FINETUNES):
        sd = {}
        for name, w in base_sd.items():
            if i == N_FINETUNES - 1 and name == "model.norm.weight":
                sd[name] = w.clone()  # a zero task vector
                continue
            private = torch.randn(w.shape, generator=gen)
            scale = 0.01 * (1.0 + 0.5 * i)
            sd[name] = (w + scale * (0.7 * shared[name] + private)).contiguous()
        d = root / f"ft{i + 1}"
        d.mkdir(parents=True)
        config.save_pretrained(d)
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        states[f"ft{i + 1}"] = sd
        ft_dirs.append(d)
    return base_dir, ft_dirs, states


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``path``."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open handles are not dicts
                out[k] = h.get_tensor(k)
    return out


# ----------------------------------------------------------------------------- recipes


@dataclass
class Case:
    name: str
    recipe: dict[str, Any]
    expect: str  # "match" or "runs"
    # (expert name, density, gamma or None) per expert, for the top-k boundary-tie excuse
    sparsity: list[tuple[str, float, float | None]] = field(default_factory=list)


def make_cases(base: Path, fts: list[Path]) -> list[Case]:
    b, f1, f2, f3 = str(base), str(fts[0]), str(fts[1]), str(fts[2])

    def m(path: str, **params: Any) -> dict[str, Any]:
        return {"model": path, "parameters": params} if params else {"model": path}

    cases = [
        Case(
            "linear",
            {
                "merge_method": "linear",
                "models": [m(f1, weight=1.0), m(f2, weight=0.5), m(f3, weight=0.8)],
                "parameters": {"normalize": True},
            },
            "match",
        ),
        Case(
            "task_arithmetic",
            {
                "merge_method": "task_arithmetic",
                "base_model": b,
                "models": [m(f1, weight=0.7), m(f2, weight=0.5), m(f3, weight=-0.3)],
                "parameters": {"lambda": 1.0, "normalize": False},
            },
            "match",
        ),
        Case(
            "ties",
            {
                "merge_method": "ties",
                "base_model": b,
                "models": [
                    m(f1, weight=1.0, density=0.5),
                    m(f2, weight=0.8, density=0.3),
                    m(f3, weight=0.6, density=0.7),
                ],
                "parameters": {"lambda": 1.0, "normalize": True},
            },
            "match",
            [("ft1", 0.5, None), ("ft2", 0.3, None), ("ft3", 0.7, None)],
        ),
        Case(
            "breadcrumbs",
            {
                "merge_method": "breadcrumbs",
                "base_model": b,
                "models": [
                    m(f1, weight=1.0, density=0.8, gamma=0.05),
                    m(f2, weight=0.7, density=0.6, gamma=0.1),
                    m(f3, weight=0.5, density=0.9, gamma=0.01),
                ],
                "parameters": {"lambda": 1.0, "normalize": False},
            },
            "match",
            [("ft1", 0.8, 0.05), ("ft2", 0.6, 0.1), ("ft3", 0.9, 0.01)],
        ),
        Case(
            "slerp",
            {
                "merge_method": "slerp",
                "base_model": b,
                "models": [m(b), m(f1)],
                "parameters": {"t": 0.3},
            },
            "match",
        ),
        Case(
            "slerp_gradient",
            {
                "merge_method": "slerp",
                "base_model": b,
                "models": [m(b), m(f2)],
                "parameters": {
                    "t": [
                        {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                        {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                        {"value": 0.5},
                    ]
                },
            },
            "match",
        ),
        Case(
            "model_stock",
            {
                "merge_method": "model_stock",
                "base_model": b,
                "models": [m(f1), m(f2), m(f3)],
            },
            "match",
        ),
        Case(
            "model_stock_filter_wise",
            {
                "merge_method": "model_stock",
                "base_model": b,
                "models": [m(f1), m(f2), m(f3)],
                "parameters": {"filter_wise": True},
            },
            "match",
        ),
        Case(
            "dare_linear",
            {
                "merge_method": "dare_linear",
                "base_model": b,
                "models": [m(f1, weight=1.0, density=0.5), m(f2, weight=0.5, density=0.5)],
                "parameters": {"lambda": 1.0, "normalize": False, "rescale": True},
            },
            "runs",
        ),
        Case(
            "nuslerp",
            {
                "merge_method": "nuslerp",
                "base_model": b,
                "models": [m(f1, weight=0.4), m(f2, weight=0.6)],
            },
            "match",
        ),
        Case(
            "nuslerp_nobase_rows",
            {
                "merge_method": "nuslerp",
                "models": [m(f1, weight=1.0), m(f3, weight=2.0)],
                "parameters": {"nuslerp_flatten": False},
            },
            "match",
        ),
    ]
    for c in cases:
        c.recipe["dtype"] = "float32"
    return cases


# ----------------------------------------------------------------------------- running


def run_cmd(cmd: list[str], log: Path) -> tuple[bool, float]:
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    return proc.returncode == 0, time.perf_counter() - start


def mergelab_cmd() -> list[str]:
    exe = shutil.which("mergelab")
    if exe:
        return [exe]
    return [sys.executable, "-c", "from mergelab.cli import main; main()"]


def tail(path: Path, n: int = 6) -> str:
    lines = path.read_text(errors="replace").strip().splitlines()
    return "\n".join("      " + line for line in lines[-n:])


# ----------------------------------------------------------------------------- comparison


def boundary_tie_mask(tau: torch.Tensor, density: float, gamma: float | None) -> torch.Tensor:
    """Elements whose |τ| equals the magnitude at a top-k cut that falls inside a run of ties.

    Cuts follow mergekit: TIES keeps the k = max(1, ⌊density·n⌋) largest magnitudes;
    Breadcrumbs keeps ascending positions n_bot … n_bot + target − 1 with target = ⌊density·n⌋,
    n_top = ⌊gamma·n⌋, n_bot = max(0, n − target − n_top).
    """
    mag = tau.abs().reshape(-1).float()
    n = mag.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    if density >= 1 or n < 2:
        return mask.reshape(tau.shape)
    asc = torch.sort(mag).values
    if gamma is None:
        k = max(1, int(density * n))
        cuts = [n - k]  # ascending index of the smallest kept element
    else:
        target = int(density * n)
        n_top = int(gamma * n)
        n_bot = max(0, n - target - n_top)
        cuts = [n_bot, n_bot + target]
    for c in cuts:
        if 0 < c < n and asc[c - 1] == asc[c]:
            mask |= mag == asc[c]
    return mask.reshape(tau.shape)


@dataclass
class Diff:
    max_abs: float = 0.0
    worst: str = "-"
    n_diff: int = 0
    n_total: int = 0
    n_excused: int = 0
    missing: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    @property
    def frac(self) -> float:
        return self.n_diff / max(1, self.n_total)


def compare(
    mk: dict[str, torch.Tensor],
    ml: dict[str, torch.Tensor],
    case: Case,
    states: StateDicts,
    verbose: bool,
) -> Diff:
    d = Diff()
    d.missing = sorted(set(mk) ^ set(ml))
    for name in sorted(set(mk) & set(ml)):
        a, b = mk[name].float(), ml[name].float()
        if a.shape != b.shape:
            d.shape_mismatch.append(name)
            continue
        err = (a - b).abs()
        differ = err > ATOL
        m = float(err.max()) if err.numel() else 0.0
        if m > d.max_abs:
            d.max_abs, d.worst = m, name
        d.n_total += err.numel()
        nd = int(differ.sum())
        d.n_diff += nd
        if nd and case.sparsity:
            tied = torch.zeros_like(differ)
            for expert, density, gamma in case.sparsity:
                tau = states[expert][name] - states["base"][name]
                tied |= boundary_tie_mask(tau, density, gamma)
            d.n_excused += int((differ & tied).sum())
        if verbose and nd:
            print(f"      {name}: max |Δ| {m:.3e}, {nd}/{err.numel()} elements differ")
    return d


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--mergekit", default=DEFAULT_MERGEKIT, help="path of mergekit-yaml (default: beside $MERGEKIT_PYTHON)"
    )
    ap.add_argument("--only", default="", help="comma-separated recipe names to run")
    ap.add_argument("--keep", type=Path, default=None, help="work in DIR and keep it")
    ap.add_argument("--verbose", "-v", action="store_true", help="list differing tensors")
    args = ap.parse_args(argv)

    mergekit = Path(args.mergekit) if args.mergekit else None
    have_mk = mergekit is not None and mergekit.exists()
    if not have_mk:
        where = mergekit if mergekit is not None else "(set MERGEKIT_PYTHON or pass --mergekit)"
        print(f"mergekit not found at {where}: skipping the mergekit side, running mergelab only")

    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        root = args.keep
        cleanup = None
    else:
        cleanup = tempfile.TemporaryDirectory(prefix="mergekit_parity_")
        root = Path(cleanup.name)

    try:
        print(f"building checkpoints in {root} ...")
        base, fts, states = build_checkpoints(root / "models")
        cases = make_cases(base, fts)
        if args.only:
            wanted = {s.strip() for s in args.only.split(",") if s.strip()}
            cases = [c for c in cases if c.name in wanted]
        ml = mergelab_cmd()

        rows = []
        failed = False
        for case in cases:
            work = root / "runs" / case.name
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            recipe = work / "recipe.yaml"
            recipe.write_text(yaml.safe_dump(case.recipe, sort_keys=False))
            print(f"- {case.name}")

            ok_ml, t_ml = run_cmd(
                [*ml, "merge", str(recipe), str(work / "mergelab"), "--force", "--quiet"], work / "mergelab.log"
            )
            if not ok_ml:
                print(f"    mergelab failed:\n{tail(work / 'mergelab.log')}")
            ok_mk, t_mk = False, 0.0
            if have_mk:
                mk_cmd = [
                    str(mergekit),
                    str(recipe),
                    str(work / "mergekit"),
                    "--random-seed",
                    "0",
                    "--no-copy-tokenizer",
                ]
                ok_mk, t_mk = run_cmd(mk_cmd, work / "mergekit.log")
                if not ok_mk:
                    print(f"    mergekit failed:\n{tail(work / 'mergekit.log')}")

            if not ok_ml:
                status, diff = "MERGELAB-ERROR", None
            elif not have_mk:
                status, diff = "ran (no mergekit)", None
            elif not ok_mk:
                status, diff = "MERGEKIT-ERROR", None
            else:
                diff = compare(load_dir(work / "mergekit"), load_dir(work / "mergelab"), case, states, args.verbose)
                structural = diff.missing or diff.shape_mismatch
                if case.expect == "runs":
                    status = "ran (not compared)" if not structural else "KEYS/SHAPES DIFFER"
                elif structural:
                    status = "KEYS/SHAPES DIFFER"
                elif diff.n_diff == 0:
                    status = "match"
                elif diff.n_excused == diff.n_diff:
                    status = "match (top-k ties)"
                else:
                    status = "MISMATCH"
                if structural:
                    print(f"    missing on one side: {diff.missing[:5]}; shape mismatch: {diff.shape_mismatch[:5]}")
            bad = status.isupper()  # errors and mismatches are upper case
            failed |= bad
            rows.append((case, status, diff, t_mk, t_ml))

        print()
        header = (
            f"{'recipe':26} {'expect':6} {'max |Δ|':>10} {'differ':>10} {'excused':>8} "
            f"{'mergekit s':>10} {'mergelab s':>10}  status"
        )
        print(header)
        print("-" * len(header))
        for case, status, diff, t_mk, t_ml in rows:
            if diff is None:
                cols = f"{'-':>10} {'-':>10} {'-':>8}"
            else:
                cols = f"{diff.max_abs:10.2e} {diff.frac:10.2%} {diff.n_excused:8d}"
            print(f"{case.name:26} {case.expect:6} {cols} {t_mk:10.1f} {t_ml:10.1f}  {status}")
        if rows and any(r[2] is not None and r[2].max_abs > 0 for r in rows):
            worst = max(
                (r for r in rows if r[2] is not None and r[0].expect == "match"),
                key=lambda r: r[2].max_abs,
                default=None,
            )
            if worst is not None:
                print(f"\nlargest difference among compared recipes: {worst[0].name}, {worst[2].worst}")
        print(
            f"\ntolerance {ATOL:g} absolute; 'differ' = fraction of elements beyond it; "
            f"'excused' = of those, elements at top-k boundary ties"
        )
        print("FAIL" if failed else "OK")
        return 1 if failed else 0
    finally:
        if cleanup is not None:
            cleanup.cleanup()


if __name__ == "__main__":
    sys.exit(main())
