"""Bit-level fingerprints of every registered method's output on fixed tiny checkpoints.

Recorded once before the core restructuring (issue 12) and checked after every change, so a
refactor that moves code but changes a single bit of any method's output fails. Each case is
(method, parameter set, input dtype); the inputs are seeded random Llama-like state dicts with
one tensor larger than the sparsifiers' 2**19-entry chunk, so chunked paths are exercised.

    python tests/golden/method_outputs.py --write               # record the cases not yet recorded (a new method)
    python tests/golden/method_outputs.py --rerecord ties       # re-record one method (only when a change is intended)

The fingerprint of a tensor is sha256 over its dtype, shape and raw bytes. Results depend on
the torch build and the CPU's kernel set (SVD, reductions), so the file records both and the
test compares only where they match.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
RECORD = HERE / "method_hashes.json"
THREADS = 2


def environment() -> dict[str, str]:
    return {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _state(seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(40, 16, generator=g)}
    for i in range(4):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(16, 16, generator=g)
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(24, 16, generator=g)
        sd[f"model.layers.{i}.input_layernorm.weight"] = 1 + 0.1 * torch.randn(16, generator=g)
    sd["model.layers.3.mlp.big.weight"] = torch.randn(800, 700, generator=g)  # > 2**19 entries
    sd["model.norm.weight"] = 1 + 0.1 * torch.randn(16, generator=g)
    sd["lm_head.weight"] = torch.randn(40, 16, generator=g)
    return {k: v.to(dtype) for k, v in sd.items()}


def _experts(base: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        scale = 0.02 * (i + 1)
        out.append({k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()})
    # an exact sign tie and exact zeros for the consensus rules
    if n >= 2:
        for k in ("model.layers.0.mlp.up_proj.weight",):
            out[1][k] = (2 * base[k].float() - out[0][k].float()).to(base[k].dtype)
    return out


def _stats(method: str, state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if method == "fisher":
            out[f"{name}::fisher"] = torch.rand(t.shape, generator=g)
        elif method.startswith("regmean") and t.dim() == 2:
            x = torch.randn(20, t.shape[1], generator=g)
            out[f"{name}::gram"] = x.T @ x
            out[f"{name}::rows"] = torch.tensor(20.0, dtype=torch.float64)
        elif method == "adamerging":
            out[f"{name}::lambda"] = torch.rand((), generator=g)
    return out


def _fingerprint(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def _param_sets(name: str) -> dict[str, tuple[dict, dict]]:
    sys.path.insert(0, str(HERE.parent / "methods"))
    from test_contract import TYPICAL_PARAMS  # the same typical points the contracts use

    sets = {"default": ({}, {})}
    if name in TYPICAL_PARAMS:
        sets["typical"] = TYPICAL_PARAMS[name]
    return sets


def _n_experts(m: Any) -> int:
    n = max(m.min_experts, 3)
    return min(n, m.max_experts) if m.max_experts is not None else n


def _merge_to_disk(name: str, base_sd, experts, gp, mp, tmp: Path) -> dict[str, torch.Tensor]:
    """Routed methods write per-task parts: merge through the engine to a folder, read everything back."""
    import mergelab

    paths = []
    for i, sd in enumerate([base_sd, *experts]):
        p = tmp / f"in{i}"
        p.mkdir()
        save_file(sd, str(p / "model.safetensors"))
        paths.append(p)
    recipe = {
        "merge_method": name,
        "base_model": str(paths[0]),
        "models": [{"model": str(p), "parameters": mp} for p in paths[1:]],
        "parameters": gp,
        "seed": 5,
    }
    out = tmp / "out"
    mergelab.merge(recipe, out, hash_inputs=False)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            part = f.relative_to(out).parent.name or "model"  # the artifact's own folder name, not its path
            tensors[f"{part}::{k}"] = v
    return tensors


def compute(methods: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
    """Fingerprints of every case of every registered method (or only of the named ``methods``)."""
    import mergelab
    from mergelab.errors import ParameterError
    from mergelab.methods import all_methods

    torch.set_num_threads(THREADS)
    wanted = None if methods is None else set(methods)
    results: dict[str, dict[str, str]] = {}
    for m in sorted(all_methods(), key=lambda m: m.name):
        if wanted is not None and m.name not in wanted:
            continue
        for dtype in (torch.float32, torch.bfloat16):
            base = _state(0, dtype)
            experts = _experts(base, _n_experts(m))
            for set_name, (gp, mp) in _param_sets(m.name).items():
                key = f"{m.name}/{set_name}/{str(dtype).removeprefix('torch.')}"
                kw: dict[str, Any] = {}
                if m.statistics is not None:
                    kw["statistics"] = [_stats(m.name, base, 7 + i) for i in range(len(experts))]
                try:
                    if m.outputs != "model":
                        with tempfile.TemporaryDirectory() as d:
                            out = _merge_to_disk(m.name, base, experts, gp, mp, Path(d))
                    else:
                        out = mergelab.merge_state_dicts(
                            m.name,
                            experts,
                            None if m.base == "ignored" else base,
                            parameters=gp,
                            model_parameters=[mp] * len(experts),
                            seed=5,
                            **kw,
                        )
                except ParameterError:
                    if set_name == "default":  # a required parameter (slerp's t): typical covers it
                        continue
                    raise
                results[key] = {k: _fingerprint(v) for k, v in sorted(out.items())}
    return results


def case_method(case: str) -> str:
    """The method of a case key ``method/parameter set/dtype``."""
    return case.split("/", 1)[0]


def updated_record(
    record: dict[str, Any] | None, current: dict[str, dict[str, str]], rerecord: Iterable[str] = ()
) -> tuple[dict[str, Any], list[str]]:
    """The record with the cases of ``current`` it lacks added, and every case of the methods named in
    ``rerecord`` replaced (their cases no longer computed are dropped); every other recorded case is
    kept as it is. Returns the new record and the keys written. A record made on another environment
    (torch build, CPU kernels) is refused: its fingerprints and the new ones would not be comparable."""
    names = set(rerecord)
    if record is None:
        record = {"environment": environment(), "cases": {}}
    if record["environment"] != environment():
        raise SystemExit(
            f"{RECORD.name} was recorded on {record['environment']}, this is {environment()}: "
            "record on the same environment (or re-record every method deliberately by deleting the file)"
        )
    cases = {k: v for k, v in record["cases"].items() if case_method(k) not in names}
    written = sorted(k for k in current if k not in cases)
    for k in written:
        cases[k] = current[k]
    return {"environment": record["environment"], "cases": dict(sorted(cases.items()))}, written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="fingerprints of every method's output (printed unless told to record)")
    ap.add_argument("--write", action="store_true", help="add the cases not yet recorded (recorded ones are kept)")
    ap.add_argument(
        "--rerecord",
        action="append",
        default=[],
        metavar="METHOD",
        help="re-record every case of METHOD (repeatable; only when a change of its output is intended)",
    )
    args = ap.parse_args(argv)
    if not (args.write or args.rerecord):
        print(json.dumps(compute(), indent=1))
        return
    from mergelab.methods import all_methods

    known = {m.name for m in all_methods()}
    unknown = sorted(set(args.rerecord) - known)
    if unknown:
        raise SystemExit(f"--rerecord: no registered method {', '.join(unknown)}")
    record = json.loads(RECORD.read_text()) if RECORD.exists() else None
    # --write looks for missing cases in every method; --rerecord alone computes only the named ones
    new, written = updated_record(record, compute(None if args.write else args.rerecord), args.rerecord)
    RECORD.write_text(json.dumps(new, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(written)} cases to {RECORD}: {', '.join(written) or 'none'}")


if __name__ == "__main__":
    main()
