"""The one chunked loop of the task-vector family: θ0 + λ · combine_i(sparsify_i(θ_i − θ0)).

TIES, DARE (linear/ties), DELLA (linear) and Model Breadcrumbs (ties) are each a
:class:`TaskVectorMerge` (a sparsifier × a combiner, mergekit's generalized task arithmetic)
built from their parameters per tensor. The loop:

* flattens the tensors and walks them in chunks of :data:`~mergelab.methods.kernels.chunks.CHUNK`
  entries (of whole rows when the sparsifier ranks rows), or in one piece when a stage needs
  the whole tensor (:attr:`TaskVectorMerge.whole`: the L1 rescale, a tensor-wide majority sign);
* per chunk: τ_i = θ_i − θ0 into one reused buffer per expert, sparsified in place (the experts
  on threads when the sparsifier asks for it), combined, then ``torch.add(θ0, τ_m, alpha=λ)``
  written into the output (every temporary lives in one :class:`Scratch`);
* thresholds that need the whole tensor (top-k, outlier bounds) are computed by the
  sparsifier's ``prepare`` before the loop, one selection pass per expert.

The unscaled form (:meth:`TaskVectorMerge.delta`) runs the same loop and keeps τ_m, so that
``merge(..., λ)`` equals ``torch.add(θ0, delta(...), alpha=λ)`` bit for bit (then cast to the
base's dtype): the memory session sweeps λ over one cached τ_m.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergelab.methods.kernels.chunks import Scratch, flat_chunks, parallel_map, row_chunks
from mergelab.methods.kernels.tensors import work_dtype
from mergelab.methods.stages.combine import Combiner
from mergelab.methods.stages.sparsify import Sparsifier

Tensor = torch.Tensor


@dataclass(frozen=True)
class TaskVectorMerge:
    """A sparsifier × combiner for one tensor. ``upcast``: work in float32 rather than the compute
    dtype the tensors arrive in (bfloat16 and float16 inputs; a float64 compute dtype stays float64,
    :func:`~mergelab.methods.kernels.tensors.work_dtype`)."""

    sparsifier: Sparsifier
    combiner: Combiner
    upcast: bool = False

    @property
    def whole(self) -> bool:
        """Whether a stage needs the whole tensor at once (else the loop runs chunk by chunk)."""
        return bool(self.sparsifier.whole or self.combiner.whole)

    def merge(self, base: Tensor, experts: Sequence[Tensor], weights: Sequence[float], scale: float) -> Tensor:
        """θ0 + scale · τ_m in the base's dtype."""
        return self._run(base, experts, weights, scale).reshape(base.shape).to(base.dtype)

    def delta(self, base: Tensor, experts: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
        """τ_m, unscaled, in the working dtype (:func:`~mergelab.methods.kernels.tensors.work_dtype` of
        the base with ``upcast``, else the base's)."""
        return self._run(base, experts, weights, None).reshape(base.shape)

    def _run(self, base: Tensor, experts: Sequence[Tensor], weights: Sequence[float], scale: float | None) -> Tensor:
        whole = self.whole
        if self.upcast:
            w = work_dtype(base)
            base, experts = base.to(w), [e.to(w) for e in experts]
        apply = self.sparsifier.prepare(base, experts, whole)
        b_flat = base.reshape(-1)
        e_flat = [e.reshape(-1) for e in experts]
        n = b_flat.numel()
        out = torch.empty_like(b_flat)
        scratch = Scratch(out)
        if whole:
            chunks = [slice(0, n)]
        else:
            chunks = row_chunks(base.shape) if self.sparsifier.rows else flat_chunks(n)
        parallel = self.sparsifier.parallel
        for sl in chunks:
            b = b_flat[sl]
            m = b.numel()
            deltas = []
            for i, e in enumerate(e_flat):
                d = torch.sub(e[sl], b, out=scratch.take(f"delta{i}", m))
                deltas.append(d if parallel else apply(i, d, scratch))
            if parallel:
                # the lambda runs inside parallel_map, before `deltas` is rebound: binding it late is safe
                deltas = parallel_map(lambda i: apply(i, deltas[i], scratch), list(range(len(deltas))), numel=m)  # noqa: B023
            merged = self.combiner(deltas, weights, scratch)
            if scale is None:
                out[sl].copy_(merged)
            else:
                torch.add(b, merged, alpha=scale, out=out[sl])
        return out
