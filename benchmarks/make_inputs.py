"""Build (or re-shard) the benchmark inputs: a random-init bf16 Llama base and its "fine-tunes".

168m and 738m (as since the first speed report): the base is a real ``LlamaForCausalLM`` saved with
``save_pretrained`` (``mergelab.synthetic.make_base``), so the whole model is built in memory once.
3b and 7b (and the ``tiny`` smoke shape): the base is written tensor by tensor with
``mergelab.synthetic.write_base_streamed`` (transformers' names, layout and init scale, no model in
memory), so memory stays at one chunk of one tensor whatever the size. The fine-tunes are written
shard by shard from the base's shards (``mergelab.synthetic.make_expert``), so memory stays bounded
by one input shard, its output copy and one tensor's float32 delta:

  ft_dense     base + N(0, 0.002) on every weight
  ft_sparse    10 % of the entries get N(0, 0.006)
  ft_conflict  base - 0.7 x ft_dense's delta + N(0, 0.0004)  (disagrees in sign with ft_dense)

7b has base + ft_dense + ft_conflict only (3 x 13.5 GB; the two experts that disagree in sign, so
TIES/DARE/DELLA still have conflicts to resolve). Every other set has all three fine-tunes.

A set is complete when ``<set>/DONE.json`` exists; an incomplete set is deleted and rebuilt. Before
building, the free disk under the work directory is checked against the set's size plus one model
(the output a benchmark run writes); ``--estimate`` prints the sizes without building.

Usage (merge_speed.py calls this in a child process; it can be run alone too):

  python benchmarks/make_inputs.py --size 168m|738m|3b|7b [--workdir DIR]
  python benchmarks/make_inputs.py --estimate
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

# Llama shapes. 738m matches the reference measurement (1.48 GB in bf16, 2 shards at 1GB); 3b and 7b
# are the shapes of issue 20 (7b: Llama-2-7B's); tiny is for smoke tests only.
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
    "3b": {
        "hidden": 3072,
        "layers": 26,
        "intermediate": 8192,
        "heads": 24,
        "vocab": 32000,
    },
    "7b": {
        "hidden": 4096,
        "layers": 32,
        "intermediate": 11008,
        "heads": 32,
        "vocab": 32000,
    },
    "tiny": {
        "hidden": 64,
        "layers": 2,
        "intermediate": 128,
        "heads": 4,
        "vocab": 128,
    },
}
MODELS = ("base", "ft_dense", "ft_sparse", "ft_conflict")
"""The models of every set except those named in SET_MODELS."""
SET_MODELS: dict[str, tuple[str, ...]] = {"7b": ("base", "ft_dense", "ft_conflict")}
STREAMED = frozenset(("3b", "7b", "tiny"))
"""Sets whose base is written tensor by tensor (write_base_streamed) instead of by save_pretrained."""
EXPERTS: dict[str, tuple[DeltaKind, int]] = {
    "ft_dense": ("dense", 1),
    "ft_sparse": ("sparse", 2),
    "ft_conflict": ("conflict", 3),
}
DELTA_SCALE = 2e-3
SHARD_SIZE = "1GB"


def set_dir(workdir: Path, size: str) -> Path:
    return Path(workdir) / size


def models_for(size: str) -> tuple[str, ...]:
    """The models of set ``size``: the base first, then its fine-tunes."""
    return SET_MODELS.get(size, MODELS)


def set_models(root: Path) -> tuple[str, ...]:
    """The models of the set at ``root``: from its DONE.json (``models``), else those of MODELS present."""
    done = root / "DONE.json"
    if done.is_file():
        listed = json.loads(done.read_text()).get("models")
        if listed:
            return tuple(listed)
    return tuple(m for m in MODELS if (root / m).is_dir()) or MODELS


def is_complete(root: Path) -> bool:
    return (root / "DONE.json").is_file() and all((root / m / "config.json").is_file() for m in set_models(root))


def param_count(shape: dict[str, int]) -> int:
    """Parameters of an untied Llama of ``shape`` (q, k, v, o all hidden x hidden: no grouped KV)."""
    h, i, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    per_layer = 4 * h * h + 3 * h * i + 2 * h
    return 2 * v * h + shape["layers"] * per_layer + h


def estimate_bytes(size: str) -> dict[str, int]:
    """Estimated disk of set ``size`` in bf16: per model, the whole set, and with one merge output."""
    per_model = 2 * param_count(SHAPES[size])
    n = len(models_for(size))
    return {"per_model": per_model, "models": n, "set": n * per_model, "with_output": (n + 1) * per_model}


class DiskSpaceError(RuntimeError):
    """Too little free disk for a set (the message names the bytes needed and free)."""


def check_disk(workdir: Path, size: str) -> None:
    """Refuse to build set ``size`` under ``workdir`` unless the set and one output fit."""
    est = estimate_bytes(size)
    probe = Path(workdir)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < est["with_output"]:
        raise DiskSpaceError(
            f"the {size} set needs {est['with_output']:,} bytes ({est['with_output'] / 1e9:.1f} GB: "
            f"{est['models']} models x {est['per_model'] / 1e9:.2f} GB, plus one merge output of the same size), "
            f"but only {free:,} bytes ({free / 1e9:.1f} GB) are free under {probe}; free some space or pass "
            "another --workdir"
        )


def parse_size(text: str) -> int:
    """'250MB' -> 250_000_000 (decimal units, as transformers uses for max_shard_size): mergelab's parser."""
    from mergelab.checkpoint.writer import parse_size as parse

    return parse(text)


def build(root: Path, size: str, *, check_space: bool = True) -> None:
    """Write the base + fine-tunes of set ``size`` under ``root`` (deleting any partial set first)."""
    import torch

    from mergelab.synthetic import make_base, make_expert, write_base_streamed

    shape = SHAPES[size]
    if root.exists():
        shutil.rmtree(root)
    if check_space:
        check_disk(root.parent, size)
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    # 168m, 738m: exactly as since the first report (the whole model in memory once); larger: tensor by tensor
    write = write_base_streamed if size in STREAMED else make_base
    base = write(
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
    for name in models_for(size)[1:]:
        kind, seed = EXPERTS[name]
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
    if size in STREAMED:  # 168m/738m keep the DONE.json they always had
        info.update(models=list(models_for(size)), base_writer="write_base_streamed")
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
    for m in set_models(src):
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
        models=list(set_models(src)),
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
    ap.add_argument("--estimate", action="store_true", help="print each set's estimated disk and exit")
    a = ap.parse_args(argv)
    if a.estimate:
        for size in SHAPES:
            est = estimate_bytes(size)
            print(
                f"{size:5s} {param_count(SHAPES[size]) / 1e6:8.1f} M parameters, {est['per_model'] / 1e9:6.2f} GB per "
                f"model, {est['models']} models = {est['set'] / 1e9:6.2f} GB; with one merge output "
                f"{est['with_output'] / 1e9:6.2f} GB"
            )
        return 0
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
    try:
        build(root, a.size)
    except DiskSpaceError as exc:
        print(f"[make_inputs] {exc}", file=sys.stderr)
        return 3
    print(f"[make_inputs] {root} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
