"""DOP: continual merging by dual orthogonal projections, one small optimisation per linear layer.

"Continual Model Merging without Data: Dual Projections for Balancing Stability and Plasticity",
NeurIPS 2025 (its code ships in FusionBench). Reference code: FusionBench ``fusion_bench/method/dop/dop_general.py``
(``DOPMerging``; ``dop.py`` ``ContinualDOPForCLIP`` is the CLIP-specific twin) and its
``min_norm_solvers`` (MGDA, Sener & Koltun 2018); defaults from ``config/method/dop/dop.yaml``.

Step t merges the pair {merged: the running merge, new: θ_t}; the first expert is taken as is.
For each linear-layer weight (:func:`mergelab.continual.base.tensor_role`), with τ_i = W_i − W0 for
i ∈ {merged, new}:

* thin SVD τ_i = U_i S_i V_iᵀ, keeping the first r_i components, r_i = the number of cumulative
  singular-value ratios cumsum(S)/ΣS below ``svd_epsilon`` (``searchsorted``, so with ε = 0.99999
  nearly full rank, and with ε = 1 every component but the one that reaches the total);
* the loss of member i, L_i(W) = ‖diag(S_i) U_iᵀ (W − W_i)‖²_F + ‖(W − W_i) V_i diag(S_i)‖²_F
  (``svd_proj_space: uv``; ``u`` / ``v`` keep one term): the distance to W_i measured in τ_i's own
  row and column spaces, weighted by its singular values;
* W starts at the mean of the pair and takes ``num_steps`` Adam steps (lr ``lr``) on s_m·L_m + s_n·L_n;
* with ``mgda`` (default) the weights come from MGDA each step: the two gradients divided by their
  losses, the min-norm point of their convex hull (the two-vector closed form, clipped to
  0.999 / 0.001 at the ends as the solver does); with ``ema`` (default) the weights are an
  exponential moving average s ← β·s + (1 − β)·s_MGDA that starts at (α, 1 − α) = (0.8, 0.2) for
  every layer. With β = 0.999 they move about 18 % of the way to MGDA's answer in 200 steps, so in
  effect the old merge weighs 0.8 and the new expert 0.2. Without ``mgda``: fixed (α, 1 − α).

Every other tensor (biases, norms, embeddings) is the plain average of the pair. **Recency
weighting:** after T experts, expert k's weight in those tensors is 2^−(T−k+1) (the first two
2^−(T−1)): the latest expert counts for one half, the one before for a quarter, and so on, so
the early experts fade exponentially from the non-linear parameters while the linear layers keep
them through the optimised projections. The reference does this too and does not say so.

Computed here as the reference does, except:

* in task-vector coordinates (X = W − W0; the losses depend on W − W_i only and Adam is
  translation-invariant), which keeps float32 precision for small τ;
* gradients in closed form, ∇L_i = 2 U S² Uᵀ D + 2 D V S² Vᵀ with D = X − τ_i, rather than by
  autograd (the same numbers; no graph kept), and :class:`Adam` written out (torch's update, in
  its order), so a step neither keeps an autograd graph nor imports ``torch.optim``;
* a member whose loss is exactly 0 (its task vector is zero in this layer, or X already equals it)
  keeps its gradient unnormalised: the reference divides 0 by 0 and writes NaN;
* ``exclude`` takes name substrings (the reference: module names) of tensors averaged instead;
* GPT-2 ``Conv1D`` weights (stored in × out; the reference would average them as non-linear) are
  optimised as the ``out × in`` matrix: transposed before the projections and back after, which
  matters for the one-sided ``svd_proj_space: u | v`` (``uv`` is the same either way). The layout
  comes from the base's ``config.json``; an in-memory state-dict base has none.

The class default of ``ema_beta`` in the reference is 0.99 (and of ``svd_epsilon`` 1.0); its shipped
configuration (what its runs use) sets 0.999 and 0.99999, the defaults here. FusionBench's page for
DOP writes the losses with S^{1/2}; its code weights by S, as here.

Cost: ``num_steps`` × 8 products of an m×n matrix with its k columns of singular vectors per linear
layer and expert: about 30 s per 768×768 layer on one CPU core (measured; 200 steps), so an
hour or more per expert for a BERT- or ViT-base-sized model on a CPU, and far more for a
vocabulary-sized head (``exclude: lm_head`` averages it instead); ``--device cuda`` helps most.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field

from mergelab.continual.base import ContinualMethod, Role, StepContext, StepSums
from mergelab.methods.kernels.linalg import thin_svd
from mergelab.methods.svd_utils import ExcludeParams, excluded

Tensor = torch.Tensor

PAPER = (
    "Continual Model Merging without Data: Dual Projections for Balancing Stability and Plasticity, NeurIPS 2025 "
    "(code: FusionBench method/dop)"
)

Basis = tuple[Tensor, Tensor, Tensor]  # U (m×r), S (r), V (n×r)


class DopParams(ExcludeParams):
    lr: float = Field(1e-4, gt=0.0, allow_inf_nan=False, description="Adam learning rate of the per-layer optimisation")
    num_steps: int = Field(200, ge=0, description="Adam steps per linear layer and expert")
    mgda: bool = Field(True, description="weigh the two losses by MGDA (loss-normalised gradients); false: (α, 1 − α)")
    ema: bool = Field(True, description="exponential moving average of the MGDA weights, from (α, 1 − α)")
    ema_beta: float = Field(
        0.999, ge=0.0, le=1.0, allow_inf_nan=False, description="EMA decay (reference config 0.999)"
    )
    alpha: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="weight of the running merge (stability); the new expert gets 1 − α (plasticity)",
    )
    svd_epsilon: float = Field(
        0.99999,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="keep the singular components whose cumulative ratio cumsum(S)/ΣS is below this",
    )
    svd_proj_space: Literal["uv", "u", "v"] = Field(
        "uv", description="uv: both projections (the paper's dual projection); u or v: one"
    )


def svd_basis(tau: Tensor, epsilon: float) -> Basis:
    """(U_r, S_r, V_r) of ``tau`` with r = searchsorted(cumsum(S)/ΣS, ε) (0 when τ = 0)."""
    u, s, vh = thin_svd(tau)
    total = s.sum()
    if bool(total > 0):
        ratio = s.cumsum(0) / total
        r = int(torch.searchsorted(ratio, torch.tensor([min(epsilon, 1.0)], dtype=ratio.dtype, device=ratio.device)))
    else:
        r = 0
    return u[:, :r], s[:r], vh[:r].T


def projection_loss(d: Tensor, basis: Basis, space: Literal["uv", "u", "v"] = "uv") -> tuple[float, Tensor]:
    """L(D) = ‖diag(S) Uᵀ D‖² + ‖D V diag(S)‖² (or one of the terms) and its gradient 2 U S² Uᵀ D + 2 D V S² Vᵀ."""
    u, s, v = basis
    loss = 0.0
    grad = torch.zeros_like(d)
    if space in ("uv", "u"):
        a = (u.T @ d).mul_(s[:, None])  # S Uᵀ D, r×n
        loss += float(a.pow(2).sum())
        grad.addmm_(u, a.mul_(s[:, None]), alpha=2.0)
    if space in ("uv", "v"):
        b = (d @ v).mul_(s[None, :])  # D V S, m×r
        loss += float(b.pow(2).sum())
        grad.addmm_(b.mul_(s[None, :]), v.T, alpha=2.0)
    return loss, grad


def min_norm_weights(g1: Tensor, g2: Tensor, n1: float = 1.0, n2: float = 1.0) -> tuple[float, float]:
    """(γ, 1 − γ) minimising ‖γ g1/n1 + (1 − γ) g2/n2‖ over γ ∈ [0, 1], clipped to 0.999 / 0.001 at the
    ends (MGDA's two-task closed form, as ``MinNormSolver._min_norm_element_from2``). ``n1``, ``n2``
    normalise the gradients (MGDA's loss normalisation) without copying them."""
    v11 = float((g1 * g1).sum()) / (n1 * n1)
    v12 = float((g1 * g2).sum()) / (n1 * n2)
    v22 = float((g2 * g2).sum()) / (n2 * n2)
    if v12 >= v11:
        gamma = 0.999
    elif v12 >= v22:
        gamma = 0.001
    else:
        gamma = (v22 - v12) / (v11 + v22 - 2.0 * v12)
    return gamma, 1.0 - gamma


class Adam:
    """``torch.optim.Adam`` with its defaults (β = (0.9, 0.999), ε = 1e-8, no weight decay) for one tensor,
    the same update in the same order, without importing ``torch.optim`` (about 80 MB of modules)."""

    def __init__(self, param: Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.step_count = 0

    def step(self, grad: Tensor) -> None:
        beta1, beta2 = self.betas
        self.step_count += 1
        self.exp_avg.lerp_(grad, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1**self.step_count)
        denom = self.exp_avg_sq.sqrt().div_((1 - beta2**self.step_count) ** 0.5).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-step_size)


def optimise_layer(
    tau_merged: Tensor, tau_new: Tensor, params: DopParams, trace: list[tuple[float, float]] | None = None
) -> Tensor:
    """The merged task vector of one linear layer: Adam on s_m·L_m + s_n·L_n from the pair's mean.

    ``trace`` (optional) receives (L_merged, L_new) before every step and after the last one.
    """
    bases = [svd_basis(tau_merged, params.svd_epsilon), svd_basis(tau_new, params.svd_epsilon)]
    targets = (tau_merged, tau_new)
    x = (tau_merged + tau_new).div_(2)
    opt = Adam(x, params.lr)
    weights = (params.alpha, 1.0 - params.alpha)
    for _ in range(params.num_steps):
        losses, grads = [], []
        for target, basis in zip(targets, bases):
            loss, grad = projection_loss(x - target, basis, params.svd_proj_space)
            losses.append(loss)
            grads.append(grad)
        if trace is not None:
            trace.append((losses[0], losses[1]))
        if params.mgda:
            norms = [loss if loss > 0 else 1.0 for loss in losses]
            sol = min_norm_weights(grads[0], grads[1], norms[0], norms[1])
            if params.ema:
                beta = params.ema_beta
                weights = (beta * weights[0] + (1 - beta) * sol[0], beta * weights[1] + (1 - beta) * sol[1])
            else:
                weights = sol
        opt.step(grads[0].mul_(weights[0]).add_(grads[1], alpha=weights[1]))
        del grads
    if trace is not None:
        last = [projection_loss(x - t, b, params.svd_proj_space)[0] for t, b in zip(targets, bases)]
        trace.append((last[0], last[1]))
    return x


def optimises(name: str, role: Role, params: DopParams) -> bool:
    """Whether DOP optimises this tensor (a linear-layer weight not excluded by name)."""
    return role == "matrix" and not excluded(name, params.exclude)


def dop_step(raw: Tensor | None, tau: Tensor, params: DopParams, ctx: StepContext) -> Tensor:
    """The optimised layer for linear weights, the pair's average elsewhere; the first expert as is."""
    if raw is None:
        return tau
    merged = raw.mul_(ctx.scale) if ctx.scale != 1.0 else raw
    if optimises(ctx.name, ctx.role, params):
        if ctx.transposed:  # a Conv1D weight, in × out: DOP's u and v spaces are those of the out × in matrix
            return optimise_layer(merged.T, tau.T, params).T.contiguous()
        return optimise_layer(merged, tau, params)
    return merged.add_(tau).mul_(0.5)


def dop_finish(stats: Mapping[str, Any], params: DopParams, t: int, sums: StepSums) -> tuple[dict[str, Any], float]:
    return {}, 1.0


def dop_workspace(name: str, shape: tuple[int, ...], role: Role, params: DopParams) -> int:
    """τ and the result; for a linear layer also two bases (U m×k, V n×k each), the parameter, Adam's
    two moments and its denominator, the two gradients, the difference X − τ_i and the loss
    products (m×k, k×n), and one SVD's workspace (copies of the matrix, ~6k²)."""
    n = math.prod(shape)
    if not optimises(name, role, params):
        return 3 * n
    rows, cols = shape
    k = min(rows, cols)
    return 11 * n + 3 * (rows * k + cols * k) + 6 * k * k


DOP = ContinualMethod(
    name="dop",
    paper=PAPER,
    summary="per linear layer, Adam on the S-weighted dual-projection losses to the running merge and the new "
    "expert, balanced by MGDA (EMA from 0.8/0.2); other tensors: the pair's average",
    params=DopParams,
    step=dop_step,
    finish=dop_finish,
    workspace=dop_workspace,
    layout_sensitive=lambda params: params.svd_proj_space != "uv",
)
