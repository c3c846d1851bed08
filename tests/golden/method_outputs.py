"""Bit-level fingerprints of every registered method's output on fixed tiny checkpoints.

Recorded once before the core restructuring (issue 12) and checked after every change, so a
refactor that moves code but changes a single bit of any method's output fails. Each case is
(method, parameter set, input dtype); the inputs are seeded random Llama-like state dicts with
one tensor larger than the sparsifiers' 2**19-entry chunk, so chunked paths are exercised.

    python tests/golden/method_outputs.py --write    # re-record (only when a change is intended)

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


def compute() -> dict[str, dict[str, str]]:
    import mergelab
    from mergelab.errors import ParameterError
    from mergelab.methods import all_methods

    torch.set_num_threads(THREADS)
    results: dict[str, dict[str, str]] = {}
    for m in sorted(all_methods(), key=lambda m: m.name):
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", action="store_true", help="re-record the fingerprints")
    args = ap.parse_args()
    results = compute()
    if args.write:
        RECORD.write_text(json.dumps({"environment": environment(), "cases": results}, indent=1, sort_keys=True) + "\n")
        print(f"wrote {len(results)} cases to {RECORD}")
    else:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
