"""I/O floor of a merge: read every tensor of every input, write one model. Nothing is computed.

Each tensor of each input model is read with a plain positional read (``os.preadv``) into a fresh
buffer — no mmap, so the bytes really move and the page cache does not count in this process's
RSS — and wrapped as a torch tensor, as any loader that materialises tensors must do. The output
is the first model's tensors, written as safetensors shards of at most ``--shard-bytes``
(default 1 GB, one shard buffered at a time, like a tool that builds each shard in memory), plus
an index file and config.json. merge_speed.py runs this in its own process and times it.

Usage: python benchmarks/io_floor.py OUT_DIR MODEL_DIR [MODEL_DIR ...] [--shard-bytes N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "I64": torch.int64,
}


class Model:
    """Tensor name -> (file descriptor, absolute offset, nbytes, dtype, shape) from the headers."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.fds: list[int] = []
        self.where: dict[str, tuple[int, int, int, str, list[int]]] = {}
        self.order: list[str] = []  # file order, then offset order
        for f in sorted(folder.glob("*.safetensors")):
            fd = os.open(f, os.O_RDONLY)
            self.fds.append(fd)
            n = int.from_bytes(os.pread(fd, 8, 0), "little")
            hdr = json.loads(os.pread(fd, n, 8))
            hdr.pop("__metadata__", None)
            for name, info in sorted(hdr.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                a, b = info["data_offsets"]
                self.where[name] = (fd, 8 + n + a, b - a, info["dtype"], info["shape"])
                self.order.append(name)

    def read(self, name: str) -> torch.Tensor:
        fd, off, nbytes, dtype, shape = self.where[name]
        buf = bytearray(nbytes)
        view, done = memoryview(buf), 0
        while done < nbytes:
            got = os.preadv(fd, [view[done:]], off + done)
            if got <= 0:
                raise OSError(f"short read in {self.folder}: {name}")
            done += got
        if not nbytes:
            return torch.empty(shape, dtype=DTYPES[dtype])
        return torch.frombuffer(buf, dtype=DTYPES[dtype]).reshape(shape)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--shard-bytes", type=int, default=1_000_000_000)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    a.out.mkdir(parents=True, exist_ok=True)
    models = [Model(m) for m in a.models]
    shard: dict[str, torch.Tensor] = {}
    used = n_shards = total_read = total_written = 0
    weight_map: dict[str, str] = {}

    def flush() -> None:
        nonlocal shard, used, n_shards
        if shard:
            n_shards += 1
            fn = f"model-{n_shards:05d}.safetensors"
            save_file(shard, str(a.out / fn), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, fn))
            shard, used = {}, 0

    for name in models[0].order:
        tensors = [m.read(name) for m in models]
        total_read += sum(t.numel() * t.element_size() for t in tensors)
        out = tensors[0]
        del tensors
        nbytes = out.numel() * out.element_size()
        if shard and used + nbytes > a.shard_bytes:
            flush()
        shard[name] = out
        used += nbytes
        total_written += nbytes
    flush()
    (a.out / "model.safetensors.index.json").write_text(
        json.dumps(
            {"metadata": {"total_size": total_written}, "weight_map": weight_map},
            indent=2,
        )
    )
    shutil.copyfile(a.models[0] / "config.json", a.out / "config.json")
    for m in models:
        m.close()
    print(
        f"read {total_read / 1e9:.2f} GB, wrote {total_written / 1e9:.2f} GB in {n_shards} shard(s), "
        f"{time.perf_counter() - t0:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
