"""Build (or re-shard) the benchmark inputs: a random-init bf16 Llama base and 3 "fine-tunes".

The base is a real ``LlamaForCausalLM`` saved with ``save_pretrained`` (``mergelab.synthetic.make_base``);
the fine-tunes are written shard by shard from the base's shards (``mergelab.synthetic.make_expert``),
so memory stays bounded by one input shard plus one tensor's delta:

  ft_dense     base + N(0, 0.002) on every weight
  ft_sparse    10 % of the entries get N(0, 0.006)
  ft_conflict  base - 0.7 x ft_dense's delta + N(0, 0.0004)  (disagrees in sign with ft_dense)

A set is complete when ``<set>/DONE.json`` exists; an incomplete set is deleted and rebuilt.

Usage (merge_speed.py calls this in a child process; it can be run alone too):

  python benchmarks/make_inputs.py --size 168m|738m [--workdir DIR]
  python benchmarks/make_inputs.py --reshard SRC_SET DST_SET --shard-size 250MB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mergelab.synthetic import DeltaKind

DEFAULT_WORKDIR = Path(__file__).resolve().parent.parent / "bench-work"

# Llama shapes. 738m matches the reference measurement (1.48 GB in bf16, 2 shards at 1GB).
SHAPES: dict[str, dict[str, int]] = {
    "168m": {
        "hidden": 1024,
        "layers": 8,
        "intermediate": 2816,
        "heads": 8,
        "vocab": 32000,
    },
    "738m": {
        "hidden": 2048,
        "layers": 12,
        "intermediate": 5504,
        "heads": 16,
        "vocab": 32000,
    },
}
MODELS = ("base", "ft_dense", "ft_sparse", "ft_conflict")
EXPERTS: dict[str, tuple[DeltaKind, int]] = {
    "ft_dense": ("dense", 1),
    "ft_sparse": ("sparse", 2),
    "ft_conflict": ("conflict", 3),
}
DELTA_SCALE = 2e-3
SHARD_SIZE = "1GB"


def set_dir(workdir: Path, size: str) -> Path:
    return Path(workdir) / size


def is_complete(root: Path) -> bool:
    return (root / "DONE.json").is_file() and all((root / m / "config.json").is_file() for m in MODELS)


def parse_size(text: str) -> int:
    """'250MB' -> 250_000_000 (decimal units, as transformers uses for max_shard_size)."""
    t = text.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def build(root: Path, size: str) -> None:
    """Write base + 3 fine-tunes under ``root`` (deleting any partial set first)."""
    import torch

    from mergelab.synthetic import make_base, make_expert

    shape = SHAPES[size]
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    base = make_base(
        root / "base",
        hidden=shape["hidden"],
        layers=shape["layers"],
        intermediate=shape["intermediate"],
        vocab=shape["vocab"],
        heads=shape["heads"],
        dtype=torch.bfloat16,
        max_shard_size=SHARD_SIZE,
        seed=0,
    )
    print(
        f"[make_inputs] {size}: base written in {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    for name, (kind, seed) in EXPERTS.items():
        make_expert(base, root / name, kind=kind, seed=seed, partner_seed=1, scale=DELTA_SCALE)
        print(
            f"[make_inputs] {size}: {name} written ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    info = {
        "size": size,
        **shape,
        "dtype": "bfloat16",
        "max_shard_size": SHARD_SIZE,
        "delta_scale": DELTA_SCALE,
        "params": count_params(root / "base"),
        "bytes_per_model": model_bytes(root / "base"),
    }
    (root / "DONE.json").write_text(json.dumps(info, indent=2))


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        hdr = json.loads(fh.read(n))
    hdr.pop("__metadata__", None)
    return 8 + n, hdr


def weight_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def count_params(model: Path) -> int:
    n = 0
    for f in weight_files(model):
        for info in _header(f)[1].values():
            k = 1
            for d in info["shape"]:
                k *= d
            n += k
    return n


def model_bytes(model: Path) -> int:
    return sum(e - s for f in weight_files(model) for s, e in (v["data_offsets"] for v in _header(f)[1].values()))


def reshard(src: Path, dst: Path, shard_size: str) -> None:
    """Copy every model of set ``src`` to ``dst`` with output shards of at most ``shard_size``.

    Tensors are read one at a time (plain reads) and each shard is written when full, so memory
    is bounded by one shard.
    """
    import torch
    from safetensors.torch import save_file

    limit = parse_size(shard_size)
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    dtypes = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    for m in MODELS:
        s_dir, d_dir = src / m, dst / m
        d_dir.mkdir()
        for f in s_dir.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
                shutil.copyfile(f, d_dir / f.name)
        # the order transformers wrote (by file, then by offset), split into small shards
        items = []
        for f in weight_files(s_dir):
            start, hdr = _header(f)
            for name, info in sorted(hdr.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                items.append((f, start, name, info))
        groups: list[list] = [[]]
        used = 0
        for it in items:
            nb = it[3]["data_offsets"][1] - it[3]["data_offsets"][0]
            if groups[-1] and used + nb > limit:
                groups.append([])
                used = 0
            groups[-1].append(it)
            used += nb
        weight_map, total = {}, 0
        for i, group in enumerate(groups, 1):
            fn = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            shard = {}
            for f, start, name, info in group:
                a, b = info["data_offsets"]
                buf = bytearray(b - a)
                with open(f, "rb", buffering=0) as fh:
                    fh.seek(start + a)
                    fh.readinto(buf)
                shard[name] = (
                    torch.frombuffer(buf, dtype=dtypes[info["dtype"]]).reshape(info["shape"])
                    if buf
                    else torch.empty(info["shape"], dtype=dtypes[info["dtype"]])
                )
                weight_map[name] = fn
                total += b - a
            save_file(shard, str(d_dir / fn), metadata={"format": "pt"})
            del shard
        (d_dir / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "metadata": {"total_size": total},
                    "weight_map": dict(sorted(weight_map.items())),
                },
                indent=2,
            )
        )
    info = json.loads((src / "DONE.json").read_text())
    info.update(
        max_shard_size=shard_size,
        resharded_from=str(src),
        shards_per_model=len(weight_files(dst / "base")),
    )
    (dst / "DONE.json").write_text(json.dumps(info, indent=2))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SHAPES))
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    ap.add_argument("--force", action="store_true", help="rebuild even if the set is complete")
    ap.add_argument("--reshard", nargs=2, metavar=("SRC_SET", "DST_SET"), type=Path)
    ap.add_argument("--shard-size", default="250MB")
    a = ap.parse_args(argv)
    if a.reshard:
        src, dst = a.reshard
        if not is_complete(src):
            print(f"[make_inputs] {src} is not a complete input set", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        reshard(src, dst, a.shard_size)
        print(f"[make_inputs] resharded {src} -> {dst} ({a.shard_size}) in {time.perf_counter() - t0:.0f} s")
        return 0
    if not a.size:
        ap.error("--size or --reshard is required")
    root = set_dir(a.workdir, a.size)
    if is_complete(root) and not a.force:
        print(f"[make_inputs] {root} is complete; nothing to do")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    build(root, a.size)
    print(f"[make_inputs] {root} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
