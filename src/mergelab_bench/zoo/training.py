"""The training loop pieces both suites' experts share: per-task seeds, the learning-rate
schedule, the batch order and the loss average; and the torch thread count of a build.

Batches are drawn without replacement from a fresh shuffle of the training set each pass (a
batch may span two passes), so ``steps x batch_size`` examples see every example about equally
often; the schedule is a linear warm-up followed by a linear decay to 0.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator, Sequence

import torch

from mergelab_bench.zoo.splits import unit_hash


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch CPU threads (``None``: unchanged), then restore the count."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def task_seed(seed: int, task: str) -> int:
    return int(unit_hash(str(seed), "train", task) * 2**31)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (steps - step) / max(1, steps - warmup))


def set_scheduled_lr(opt: torch.optim.Optimizer, base_lrs: Sequence[float], step: int, steps: int, warmup: int) -> None:
    """Set every parameter group's learning rate to its base rate times :func:`lr_factor`."""
    for group, base_lr in zip(opt.param_groups, base_lrs, strict=True):
        group["lr"] = base_lr * lr_factor(step, steps, warmup)


def epoch_batches(n: int, batch_size: int, rng: random.Random) -> Iterator[list[int]]:
    """Endless index batches over ``range(n)``: the order is refilled with a fresh ``rng`` shuffle
    whenever fewer than ``batch_size`` indices are left."""
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(n))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[:batch_size], order[batch_size:]
        yield idx


def loss_ema(previous: float, value: float) -> float:
    """The training loss's exponential moving average (0.9 decay; the first value starts it)."""
    return value if math.isnan(previous) else 0.9 * previous + 0.1 * value
