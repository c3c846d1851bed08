"""Routed layers: a shared layer plus per-expert updates mixed in activation space.

For a linear layer the merged weight of a route w (one weight per expert) is
``W(w) = W* + Σₜ wₜ ΔWₜ``, and since the layer is linear in its weight,

    W(w) x + b(w) = W* x + b* + Σₜ wₜ (ΔWₜ x + Δbₜ),

with ``ΔWₜ x = Bₜ (Aₜ x)`` for a low-rank update. Computing the right-hand side is exactly the
weight-space merge, but each row of a batch (or each token) can have its own ``w`` and no merged
weight is ever formed: the experts' factors are stacked once at load time and every forward
runs two small batched products. The same holds for embeddings (a lookup is linear in the table)
and for normalisation layers (LayerNorm, RMSNorm: ``x̂ ⊙ γ + β`` is affine in ``(γ, β)``), whose
route output is ``f(x; p*) + Σₜ wₜ (f(x; p* + Δpₜ) − f(x; p*))``.

Where the weights come from:

* :class:`RouteState` (one per :class:`mergelab.routed.RoutedModel`): per-sequence weights
  ``[batch, experts]`` set before the forward (a router, or a fixed route), or ``active = False``
  for the shared model alone;
* a layer's own gate (``gate``: :class:`SmileGate`, per token, from the layer's input);
* a block slot (:class:`BlockSlot`: WEMoE, per sequence, set by the gate of the block the layer
  belongs to).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from mergelab.routed.adapters import ExpertDelta

Tensor = torch.Tensor


@dataclass
class RouteState:
    """What the routed layers of one model read during a forward.

    ``weights``: ``[batch, experts]`` (per sequence) or ``[batch, seq, experts]`` (per token);
    ``active``: False runs the shared model alone (the router's own pass); ``forced``: ``weights`` is a
    fixed route that also overrides the layers' own gates; ``token_mask``: the
    forward's attention mask (for masked means over tokens); ``records``: per-layer weights of
    local gates, kept when ``record`` is set (diagnostics, the sequence-level route of
    token-routed methods).
    """

    weights: Tensor | None = None
    active: bool = True
    forced: bool = False
    token_mask: Tensor | None = None
    record: bool = False
    records: list[Tensor] = field(default_factory=list)

    @contextlib.contextmanager
    def inactive(self) -> Iterator[None]:
        prev = self.active
        self.active = False
        try:
            yield
        finally:
            self.active = prev


def expand_weights(w: Tensor, x: Tensor, feature_dims: int = 1) -> Tensor:
    """``w`` (``[B, T]`` or ``[B, S, T]``) shaped to broadcast against ``x`` without its last
    ``feature_dims`` dimensions, plus a trailing experts axis."""
    lead = x.dim() - feature_dims
    if w.dim() - 1 == lead:
        return w
    if w.dim() == 2 and lead >= 1:
        return w.reshape(w.shape[0], *([1] * (lead - 1)), w.shape[1])
    if w.dim() == 3 and lead == 1:  # per-token weights, a per-sequence input (a pooler): mean over tokens
        return w.mean(dim=1)
    raise ValueError(f"routing weights of shape {list(w.shape)} do not fit an input of shape {list(x.shape)}")


class BlockSlot:
    """Per-block routing weights (WEMoE): set by the block's gate, read by the block's layers."""

    def __init__(self) -> None:
        self.weights: Tensor | None = None


class SmileGate(nn.Module):
    """SMILE's router of one linear layer (Tang et al. 2024, arXiv:2408.10174).

    ``logitₜ(x) = ‖Gₜ x‖₂`` with ``Gₜ`` the top ``gate_k`` right singular vectors of expert t's
    update (no singular values); softmax over experts, keep the ``top_k`` largest, renormalise
    them to sum 1; per token. With one expert the weight is 1.
    """

    gates: Tensor

    def __init__(self, gates: Tensor, top_k: int) -> None:
        super().__init__()
        self.register_buffer("gates", gates)  # [T, gate_k, in]
        self.top_k = top_k

    def forward(self, x: Tensor) -> Tensor:
        g = self.gates.to(x.dtype)
        t = int(g.shape[0])
        if t == 1:
            return torch.ones((*x.shape[:-1], 1), dtype=x.dtype, device=x.device)
        logits = torch.einsum("...i,tki->...tk", x, g).norm(dim=-1)
        probs = torch.softmax(logits, dim=-1)
        k = min(self.top_k, t)
        top, idx = probs.topk(k, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, idx, top)


class WemoeGate(nn.Module):
    """WEMoE's gate of one feed-forward block (Tang et al. 2024, arXiv:2402.00433).

    ``depth`` 2: Linear(d, d) → ReLU → Linear(d, T); 1: Linear(d, T); 0: a learned vector.
    Initialised as the reference: weights N(0, 0.01), first bias 0, last bias ``init_lambda``, so
    every coefficient starts near ``init_lambda``. No softmax: the coefficients are the raw
    outputs, averaged over the sequence's tokens (masked by the attention mask when given).
    """

    def __init__(self, hidden: int, experts: int, depth: int = 2, init_lambda: float = 0.3) -> None:
        super().__init__()
        self.depth = depth
        if depth == 0:
            self.weight = nn.Parameter(torch.full((experts,), float(init_lambda)))
        elif depth == 1:
            self.fc = nn.Linear(hidden, experts)
        elif depth == 2:
            self.fc1 = nn.Linear(hidden, hidden)
            self.fc2 = nn.Linear(hidden, experts)
        else:
            raise ValueError(f"WEMoE gate depth {depth}: use 0, 1 or 2")
        self.init_lambda = init_lambda

    def init_weights(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            if self.depth == 1:
                self.fc.weight.normal_(0.0, 0.01, generator=generator)
                self.fc.bias.fill_(self.init_lambda)
            elif self.depth == 2:
                self.fc1.weight.normal_(0.0, 0.01, generator=generator)
                self.fc1.bias.zero_()
                self.fc2.weight.normal_(0.0, 0.01, generator=generator)
                self.fc2.bias.fill_(self.init_lambda)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.depth == 0:
            return self.weight.to(x.dtype).expand(x.shape[0], -1)
        if self.depth == 1:
            out = self.fc(x)
        else:
            out = self.fc2(F.relu(self.fc1(x)))
        if out.dim() == 2:  # one vector per row already
            return out
        if mask is not None and mask.shape[:2] == out.shape[:2]:
            m = mask.to(out.dtype).unsqueeze(-1)
            return (out * m).sum(1) / m.sum(1).clamp_min(1.0)
        return out.mean(dim=1)


class _Routed(nn.Module):
    """Shared parts of the routed layers: the wrapped layer, the state and where weights come from."""

    def __init__(self, base: nn.Module, state: RouteState, gate: nn.Module | None, slot: BlockSlot | None) -> None:
        super().__init__()
        self.base = base
        self.state = state
        self.gate = gate
        self.slot = slot

    def route(self, x: Tensor, feature_dims: int = 1) -> Tensor | None:
        if not self.state.active:
            return None
        if self.gate is not None and not self.state.forced:
            w = self.gate(x)
            if self.state.record:
                self.state.records.append(w.detach())
            return w
        if self.slot is not None:
            w = self.slot.weights
        else:
            w = self.state.weights
        if w is None:
            return None
        return expand_weights(w.to(x.dtype), x, feature_dims)

    # transformers reads these of linear layers (device, dtype, tied weights)
    @property
    def weight(self) -> Tensor:
        return self.base.weight  # type: ignore[return-value]


def dense_mix(x: Tensor, dense: Tensor, w: Tensor) -> Tensor:
    """``Σₜ wₜ (x Dₜᵀ)`` for ``x`` ``[..., in]``, ``dense`` ``[T, out, in]`` and ``w`` broadcastable to
    ``[..., T]``, computing only the (row, expert) products whose weight is non-zero.

    When every row mixes every expert (softmax routes) this is one batched product, as before; a
    sparse route (top-1 TALL masks or EMR, top-k, a zero route) costs one product per routed pair
    instead of ``T`` per row. Rows with weight exactly zero contribute exactly zero either way. When
    ``w`` requires a gradient (WEMoE's gates in training) every product is computed, so that a weight
    that is exactly zero still gets its gradient.
    """
    experts = int(dense.shape[0])
    lead = x.shape[:-1]
    wf = w.expand(*lead, experts).reshape(-1, experts)
    xf = x.reshape(-1, x.shape[-1])
    nonzero = wf != 0
    if w.requires_grad or bool(nonzero.all()):
        z = torch.einsum("ni,toi->nto", xf, dense)
        return (z * wf.unsqueeze(-1)).sum(dim=1).reshape(*lead, -1)
    out = xf.new_zeros(xf.shape[0], dense.shape[1])
    for t in nonzero.any(dim=0).nonzero().flatten().tolist():
        rows = nonzero[:, t].nonzero().flatten()
        out.index_add_(0, rows, (xf[rows] @ dense[t].T) * wf[rows, t].unsqueeze(-1))
    return out.reshape(*lead, -1)


def _stack(tensors: Sequence[Tensor | None], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    return torch.stack([t.to(dtype) if t is not None else torch.zeros(shape, dtype=dtype) for t in tensors])


def _work(dtype: torch.dtype) -> torch.dtype:
    """The dtype the stacks are built in: float64 stays float64, anything narrower builds in float32."""
    return torch.promote_types(dtype, torch.float32)


class RoutedLinear(_Routed):
    """A linear layer (``nn.Linear``, or GPT-2 ``Conv1D`` with ``transposed``) with routed expert updates."""

    lora_a: Tensor | None
    lora_b: Tensor | None
    dense: Tensor | None
    bias_delta: Tensor | None

    def __init__(
        self,
        base: nn.Module,
        deltas: Sequence[ExpertDelta | None],
        state: RouteState,
        *,
        transposed: bool = False,
        gate: nn.Module | None = None,
        slot: BlockSlot | None = None,
        dense_rank_ratio: float = 0.5,
    ) -> None:
        super().__init__(base, state, gate, slot)
        w = base.weight
        assert isinstance(w, torch.Tensor)
        out_f, in_f = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        self.transposed = transposed
        self.experts = len(deltas)
        wd = _work(w.dtype)
        lora: list[tuple[Tensor, Tensor] | None] = []
        dense: list[Tensor | None] = []
        bias: list[Tensor | None] = []
        for d in deltas:
            a_b = None
            dw: Tensor | None = None
            if d is not None and d.lora is not None:
                f = d.lora
                if f.rank >= dense_rank_ratio * min(out_f, in_f):
                    dw = f.delta(wd)  # as cheap dense as factored: one product
                else:
                    a_b = (f.A.to(wd), f.B.to(wd) * f.scaling)
            if d is not None and "weight" in d.dense:
                extra = d.dense["weight"].to(wd)
                extra = extra.T if transposed else extra
                dw = extra if dw is None else dw + extra
            lora.append(a_b)
            dense.append(dw)
            db = d.dense.get("bias") if d is not None else None
            bias.append(db.to(wd) if db is not None else None)
        ranks = [ab[0].shape[0] for ab in lora if ab is not None]
        r = max(ranks, default=0)
        if r:
            a = torch.zeros(len(deltas), r, in_f, dtype=wd)
            b = torch.zeros(len(deltas), out_f, r, dtype=wd)
            for t, ab in enumerate(lora):
                if ab is not None:
                    a[t, : ab[0].shape[0]] = ab[0]
                    b[t, :, : ab[1].shape[1]] = ab[1]
            self.register_buffer("lora_a", a.to(w.dtype))
            self.register_buffer("lora_b", b.to(w.dtype))
        else:
            self.register_buffer("lora_a", None)
            self.register_buffer("lora_b", None)
        self.register_buffer(
            "dense", _stack(dense, (out_f, in_f), wd).to(w.dtype) if any(x is not None for x in dense) else None
        )
        self.register_buffer(
            "bias_delta", _stack(bias, (out_f,), wd).to(w.dtype) if any(x is not None for x in bias) else None
        )

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base, "bias", None)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        w = self.route(x)
        if w is None:
            return y
        w = w.to(y.dtype)
        if self.lora_a is not None and self.lora_b is not None:
            z = torch.einsum("...i,tri->...tr", x, self.lora_a.to(x.dtype))
            y = y + torch.einsum("...tr,tor->...o", z * w.unsqueeze(-1), self.lora_b.to(x.dtype))
        if self.dense is not None:
            y = y + dense_mix(x, self.dense.to(x.dtype), w)
        if self.bias_delta is not None:
            y = y + w @ self.bias_delta.to(y.dtype)
        return y


class RoutedEmbedding(_Routed):
    """An ``nn.Embedding`` with routed expert updates (embedding LoRA: ``ΔE = (B A)ᵀ``, or dense)."""

    lora_a: Tensor | None
    lora_b: Tensor | None
    dense: Tensor | None

    def __init__(self, base: nn.Embedding, deltas: Sequence[ExpertDelta | None], state: RouteState) -> None:
        super().__init__(base, state, None, None)
        num, dim = base.weight.shape
        wd = _work(base.weight.dtype)
        lora: list[tuple[Tensor, Tensor] | None] = []
        dense: list[Tensor | None] = []
        for d in deltas:
            lora.append((d.lora.A.to(wd), d.lora.B.to(wd) * d.lora.scaling) if d and d.lora else None)
            dense.append(d.dense["weight"].to(wd) if d and "weight" in d.dense else None)
        r = max((ab[0].shape[0] for ab in lora if ab is not None), default=0)
        if r:
            a = torch.zeros(len(deltas), num, r, dtype=wd)  # Aᵀ per expert: a lookup table of rank-r codes
            b = torch.zeros(len(deltas), dim, r, dtype=wd)
            for t, ab in enumerate(lora):
                if ab is not None:
                    a[t, :, : ab[0].shape[0]] = ab[0].T
                    b[t, :, : ab[1].shape[1]] = ab[1]
            self.register_buffer("lora_a", a.to(base.weight.dtype))
            self.register_buffer("lora_b", b.to(base.weight.dtype))
        else:
            self.register_buffer("lora_a", None)
            self.register_buffer("lora_b", None)
        self.register_buffer(
            "dense", _stack(dense, (num, dim), wd).to(base.weight.dtype) if any(x is not None for x in dense) else None
        )

    @property
    def num_embeddings(self) -> int:
        return int(self.base.num_embeddings)  # type: ignore[arg-type]

    @property
    def embedding_dim(self) -> int:
        return int(self.base.embedding_dim)  # type: ignore[arg-type]

    @property
    def padding_idx(self) -> int | None:
        return self.base.padding_idx  # type: ignore[return-value]

    def forward(self, ids: Tensor) -> Tensor:
        y = self.base(ids)
        w = self.route(y)
        if w is None:
            return y
        w = w.to(y.dtype)
        if self.lora_a is not None and self.lora_b is not None:
            codes = self.lora_a[:, ids].to(y.dtype)  # [T, ..., r]
            codes = codes.movedim(0, -2)  # [..., T, r]
            y = y + torch.einsum("...tr,tdr->...d", codes * w.unsqueeze(-1), self.lora_b.to(y.dtype))
        if self.dense is not None:
            rows = self.dense[:, ids].to(y.dtype).movedim(0, -2)  # [..., T, d]
            y = y + (rows * w.unsqueeze(-1)).sum(dim=-2)
        return y


class RoutedAffine(_Routed):
    """A layer whose output is affine in its parameters (LayerNorm, RMSNorm) with routed dense updates."""

    def __init__(self, base: nn.Module, deltas: Sequence[ExpertDelta | None], state: RouteState) -> None:
        super().__init__(base, state, None, None)
        params = dict(base.named_parameters(recurse=False))
        self.param_names = sorted(params)
        self.active_experts = [t for t, d in enumerate(deltas) if d is not None and d.dense]
        for n, p in params.items():
            stacked = torch.zeros((len(deltas), *p.shape), dtype=_work(p.dtype))
            for t, d in enumerate(deltas):
                if d is not None and n in d.dense:
                    stacked[t] = d.dense[n]
            self.register_buffer(f"delta_{n}", stacked.to(p.dtype))

    def _delta(self, name: str) -> Tensor:
        t = getattr(self, f"delta_{name}")
        assert isinstance(t, torch.Tensor)
        return t

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        w = self.route(y)
        if w is None:
            return y
        w = w.to(y.dtype)
        params = dict(self.base.named_parameters(recurse=False))
        out = y
        for t in self.active_experts:
            full = {n: params[n] + self._delta(n)[t] for n in self.param_names}
            yt = torch.func.functional_call(self.base, full, (x,))
            out = out + w[..., t : t + 1] * (yt - y)
        return out
