"""Reference keep masks of DARE/DELLA's pinned sampling scheme (bool masks, as the scheme is
specified): 16-bit lanes of the generator's int64 draws, kept iff lane + 2¹⁵ < round(p·2¹⁶)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def bernoulli_mask(delta: Tensor, keep_prob: float | Tensor, generator: torch.Generator) -> Tensor:
    """Independent keep decisions with P(keep) = round(p·2¹⁶)/2¹⁶, drawing ⌈n/4⌉ int64 words
    (none when p ≤ 0 or p ≥ 1 for a scalar p)."""
    n = delta.numel()
    if not isinstance(keep_prob, Tensor):
        t = round(keep_prob * 65536)
        if t <= 0:
            return torch.zeros(delta.shape, dtype=torch.bool)
        if t >= 65536:
            return torch.ones(delta.shape, dtype=torch.bool)
        threshold: float | Tensor = float(t)
    else:
        threshold = (keep_prob.double() * 65536).round()
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=generator)
    u = words.view(torch.int16)[:n].to(torch.int32).reshape(delta.shape) + 32768
    return u < threshold
