"""Task-vector statistics in one streamed pass over the tensors.

For a base θ0 and experts θ_1..θ_T (τ_i = θ_i − θ0), :class:`TaskVectorStats` folds in one
tensor at a time and keeps only per-expert, per-pair and per-layer scalars, so the analysis
runs on checkpoints larger than memory (working set: about 2T float32 copies of the largest
tensor, the task vectors and their magnitudes, plus a few boolean masks of its size). Every
statistic is exact (float64 accumulation, integer counts), not sampled:

* **norms**: ‖τ_i‖₂ over the model and per layer (a layer = the tensors of one transformer
  block; embeddings, final norm and head are grouped as ``other``);
* **cosine**: cos(τ_i, τ_j) = ⟨τ_i, τ_j⟩ / (‖τ_i‖‖τ_j‖), over the model and per layer
  (``None`` where a norm is 0);
* **sign conflicts among the top-k**: S_i = the entries in the top ``topk`` fraction of |τ_i|
  (per tensor, k = max(1, ⌊topk·n⌋) as the TIES trim; entries tied with the k-th magnitude
  are kept) that are non-zero. Per pair, ``rate`` = #{p ∈ S_i ∩ S_j : τ_i[p]·τ_j[p] < 0} /
  #(S_i ∩ S_j) and ``overlap`` = #(S_i ∩ S_j) / min(#S_i, #S_j). Over all experts,
  ``all_experts_rate`` = among entries in at least two S_i, the fraction whose signs there
  are not all equal (the interference TIES's sign election resolves);
* **TALL masks** at λ = ``tall_lambda`` (Wang et al. 2024): τ_MTL = Σ_i τ_i, m_t = 1[|τ_t| >
  λ|τ_MTL − τ_t|], c = Σ_t m_t: weights each task claims, the histogram of c, ``selfish``
  (c = 1, per task and total), ``catastrophic`` (c = 0) of which ``untouched`` (no expert
  moved the weight at all);
* **density after each sparsifier** (fraction of the model's entries left non-zero, per
  expert): ``nonzero`` (no sparsifier), ``ties`` (top-``density`` magnitudes per tensor,
  counted), ``breadcrumbs`` (drop the top ``gamma`` and bottom entries, counted), ``dare``
  (expected: keep probability × non-zero entries, exact expectation), ``della`` (expected:
  Σ of the rank-based keep probabilities over the non-zero entries, exact expectation in
  closed form, see :func:`della_expected_kept`). The parameters default to those methods'
  mergelab defaults. Top-k thresholds are exact k-th values (``torch.kthvalue`` up to 2**24
  elements, the radix select of :mod:`mergelab.methods.kernels.select` above).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mergelab.methods.kernels.select import keep_count, kth_largest

Tensor = torch.Tensor

OTHER = "other"
_CHUNK = 1 << 22  # elements per float64 Gram block


def _default(method: str, key: str) -> float:
    from mergelab.methods.registry import get_method

    return float(get_method(method).model_params.model_fields[key].default)


@dataclass
class AnalysisOptions:
    """Parameters of the statistics (sparsifier defaults: those of mergelab's methods)."""

    topk: float = 0.2
    tall_lambda: float = 0.6
    ties_density: float = field(default_factory=lambda: _default("ties", "density"))
    dare_density: float = field(default_factory=lambda: _default("dare_linear", "density"))
    breadcrumbs_density: float = field(default_factory=lambda: _default("breadcrumbs", "density"))
    breadcrumbs_gamma: float = field(default_factory=lambda: _default("breadcrumbs", "gamma"))
    della_density: float = field(default_factory=lambda: _default("della", "density"))
    della_epsilon: float = field(default_factory=lambda: _default("della", "epsilon"))

    def __post_init__(self) -> None:
        for name in (
            "topk",
            "ties_density",
            "dare_density",
            "breadcrumbs_density",
            "breadcrumbs_gamma",
            "della_density",
        ):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.tall_lambda < 0:
            raise ValueError(f"tall_lambda must be ≥ 0, got {self.tall_lambda}")
        if self.della_density < 1 and not (
            self.della_density - self.della_epsilon > 0 and self.della_density + self.della_epsilon <= 1 + 1e-9
        ):
            raise ValueError("della needs 0 < density − epsilon and density + epsilon ≤ 1")


#: Below this many elements a k-th value comes from ``torch.kthvalue`` (the radix select of
#: :func:`mergelab.methods.kernels.select.kth_largest` has a fixed cost of a few ms per call); both
#: return the exact k-th value, so the masks are identical.
_SMALL = 1 << 24


def _kth_largest(mag: Tensor, k: int) -> float:
    n = mag.numel()
    if n <= _SMALL:
        return float(torch.kthvalue(mag.reshape(-1).float().cpu(), n - k + 1).values)
    return kth_largest(mag, k)


def _topk_from_mag(mag: Tensor, density: float) -> Tensor:
    if density >= 1:
        return torch.ones_like(mag, dtype=torch.bool)
    k = keep_count(mag.numel(), density, at_least_one=True)
    if k == 0:
        return torch.zeros_like(mag, dtype=torch.bool)
    return mag >= _kth_largest(mag, k)


def _breadcrumbs_from_mag(mag: Tensor, density: float, gamma: float) -> Tensor:
    n = mag.numel()
    if density >= 1:
        return torch.ones_like(mag, dtype=torch.bool)
    target = keep_count(n, density)
    if target == 0:
        return torch.zeros_like(mag, dtype=torch.bool)
    n_top = min(n, int(gamma * n))
    n_bottom = max(0, n - target - n_top)
    mask = torch.ones_like(mag, dtype=torch.bool)
    if n_bottom > 0:
        mask &= mag >= _kth_largest(mag, n - n_bottom)  # the (n_bottom + 1)-th smallest
    if n_bottom + target < n:
        mask &= mag <= _kth_largest(mag, n - n_bottom - target + 1)  # the (n_bottom + target)-th smallest
    return mask


def topk_mask(delta: Tensor, density: float) -> Tensor:
    """The TIES trim mask (as :func:`mergelab.methods.stages.sparsify.magnitude_mask`): the
    ``max(1, ⌊density·n⌋)`` largest |τ|, entries tied with the k-th kept too."""
    return _topk_from_mag(delta.abs(), density)


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """The Model Breadcrumbs mask (as :func:`mergelab.methods.stages.sparsify.outlier_mask`)."""
    return _breadcrumbs_from_mag(delta.abs(), density, gamma)


def _count(mask: Tensor) -> int:
    return int(torch.count_nonzero(mask))


def della_expected_kept(nonzero: Tensor, density: float, epsilon: float) -> float:
    """E[number of non-zero entries DELLA's MagPrune keeps] for one tensor, in closed form.

    MagPrune keeps entry p of a row of n with probability (density − ε) + 2ε·r_p/(n − 1), r_p its
    ascending-magnitude rank (:func:`mergelab.methods.stages.sparsify.rank_keep_probs`; rows as there:
    a 0-/1-D tensor is one row, a k-D one has shape[0] rows). The z zeros of a row hold the
    ranks 0 … z − 1 whatever the tie order, so the non-zero entries hold ranks z … n − 1 and the
    expectation needs only z per row: Σ_{r=z}^{n−1} (density − ε) + 2ε r/(n − 1). A row of
    length 1 has p = density.
    """
    if density >= 1:
        return float(_count(nonzero))
    rows = nonzero.reshape(1, -1) if nonzero.dim() < 2 else nonzero.reshape(nonzero.shape[0], -1)
    n = rows.shape[1]
    if n == 0:
        return 0.0
    k = torch.count_nonzero(rows, dim=1).to(torch.float64)  # non-zeros per row
    if n == 1:
        return float(k.sum()) * density
    z = n - k
    rank_sum = (z + (n - 1)) * k / 2  # Σ of the ranks z … n − 1
    return float(((density - epsilon) * k + 2 * epsilon * rank_sum / (n - 1)).sum())


def _pairs(t: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(t) for j in range(i + 1, t)]


def _gram(deltas: Sequence[Tensor]) -> Tensor:
    """Σ over entries of τ_i τ_j (T × T, float64), in blocks so the float64 copy stays small."""
    flat = torch.stack([d.reshape(-1) for d in deltas])
    g = torch.zeros(len(deltas), len(deltas), dtype=torch.float64)
    for s in range(0, flat.shape[1], _CHUNK):
        block = flat[:, s : s + _CHUNK].double()
        g += (block @ block.T).cpu()
    return g


class TaskVectorStats:
    """Accumulates the statistics tensor by tensor (see the module docstring)."""

    def __init__(self, n_experts: int, options: AnalysisOptions | None = None):
        self.t = n_experts
        self.opts = options or AnalysisOptions()
        t = n_experts
        self.numel = 0
        self.tensors = 0
        self.layer_numel: dict[Any, int] = {}
        self.gram = torch.zeros(t, t, dtype=torch.float64)
        self.layer_gram: dict[Any, Tensor] = {}
        # top-k sign conflicts
        self.topk_count = [0] * t
        self.inter = torch.zeros(t, t, dtype=torch.int64)
        self.conflict = torch.zeros(t, t, dtype=torch.int64)
        self.multi = 0
        self.multi_conflict = 0
        # TALL
        self.claimed = [0] * t
        self.selfish = [0] * t
        self.hist = torch.zeros(t + 1, dtype=torch.int64)
        self.untouched = 0
        # densities
        self.nonzero = [0] * t
        self.ties_kept = [0] * t
        self.breadcrumbs_kept = [0] * t
        self.dare_expected = [0.0] * t
        self.della_expected = [0.0] * t

    # ------------------------------------------------------------------------------------

    def update(self, base: Tensor, experts: Sequence[Tensor], layer: int | None = None) -> None:
        """Fold in one tensor: the base's and each expert's (same shape, any float dtype)."""
        if len(experts) != self.t:
            raise ValueError(f"expected {self.t} experts, got {len(experts)}")
        n = base.numel()
        if n == 0:
            return
        b = base.float()
        deltas = [e.float() - b for e in experts]
        del b
        key = OTHER if layer is None else int(layer)
        self.numel += n
        self.tensors += 1
        self.layer_numel[key] = self.layer_numel.get(key, 0) + n
        g = _gram(deltas)
        self.gram += g
        self.layer_gram[key] = self.layer_gram.get(key, torch.zeros_like(g)) + g
        mags = [d.abs() for d in deltas]
        nonzero = [m != 0 for m in mags]
        self._topk(deltas, mags, nonzero)
        self._tall(deltas, mags, nonzero)

    def _topk(self, deltas: Sequence[Tensor], mags: Sequence[Tensor], nonzero: Sequence[Tensor]) -> None:
        o = self.opts
        sel, neg = [], []
        for i, (d, mag, nz) in enumerate(zip(deltas, mags, nonzero)):
            s = _topk_from_mag(mag, o.topk).logical_and_(nz)
            n_sel = _count(s)
            self.topk_count[i] += n_sel
            sel.append(s)
            neg.append(torch.signbit(d))
            # densities after each sparsifier
            nnz = _count(nz)
            self.nonzero[i] += nnz
            self.ties_kept[i] += (
                n_sel if o.ties_density == o.topk else _count(_topk_from_mag(mag, o.ties_density).logical_and_(nz))
            )
            self.breadcrumbs_kept[i] += _count(
                _breadcrumbs_from_mag(mag, o.breadcrumbs_density, o.breadcrumbs_gamma).logical_and_(nz)
            )
            self.dare_expected[i] += o.dare_density * nnz
            self.della_expected[i] += della_expected_kept(nz, o.della_density, o.della_epsilon)
        for i, j in _pairs(self.t):
            both = sel[i] & sel[j]
            inter = _count(both)
            conf = _count(both.logical_and_(neg[i] != neg[j]))  # both non-zero there: opposite signs
            self.inter[i, j] += inter
            self.inter[j, i] += inter
            self.conflict[i, j] += conf
            self.conflict[j, i] += conf
        if self.t >= 2:
            count = torch.zeros(deltas[0].shape, dtype=torch.uint8 if self.t < 256 else torch.int32)
            any_pos = torch.zeros(deltas[0].shape, dtype=torch.bool)
            any_neg = torch.zeros_like(any_pos)
            for s, n in zip(sel, neg):
                count.add_(s)
                any_pos |= s & ~n
                any_neg |= s & n
            multi = count >= 2
            self.multi += _count(multi)
            self.multi_conflict += _count(multi.logical_and_(any_pos).logical_and_(any_neg))

    def _tall(self, deltas: Sequence[Tensor], mags: Sequence[Tensor], nonzero: Sequence[Tensor]) -> None:
        lam = self.opts.tall_lambda
        tau = torch.zeros_like(deltas[0])
        for d in deltas:
            tau.add_(d)
        count = torch.zeros(tau.shape, dtype=torch.uint8 if self.t < 256 else torch.int32)
        masks = []
        for i, (d, mag) in enumerate(zip(deltas, mags)):
            m = mag > torch.sub(tau, d).abs_().mul_(lam)
            self.claimed[i] += _count(m)
            count.add_(m)
            masks.append(m)
        del tau
        self.hist += torch.bincount(count.reshape(-1).to(torch.int64), minlength=self.t + 1)[: self.t + 1]
        single = count == 1
        for i, m in enumerate(masks):
            self.selfish[i] += _count(m.logical_and_(single))
        moved = torch.zeros_like(single)
        for nz in nonzero:
            moved |= nz
        self.untouched += moved.numel() - _count(moved)

    # ------------------------------------------------------------------------------------

    @staticmethod
    def _cosines(g: Tensor) -> list[list[float | None]]:
        norms = g.diagonal().clamp_min(0).sqrt()
        t = g.shape[0]
        out: list[list[float | None]] = []
        for i in range(t):
            row: list[float | None] = []
            for j in range(t):
                den = float(norms[i] * norms[j])
                row.append(float(g[i, j]) / den if den > 0 else None)
            out.append(row)
        return out

    def layers(self) -> list[Any]:
        ints = sorted(k for k in self.layer_numel if k != OTHER)
        return ints + ([OTHER] if OTHER in self.layer_numel else [])

    def result(self) -> dict[str, Any]:
        """Every statistic as plain JSON-serialisable numbers."""
        t, n = self.t, max(self.numel, 1)
        layers = self.layers()
        norms = [float(x) for x in self.gram.diagonal().clamp_min(0).sqrt()]
        per_layer_norms = {
            str(k): [float(x) for x in self.layer_gram[k].diagonal().clamp_min(0).sqrt()] for k in layers
        }
        rate = [
            [
                None if i == j or int(self.inter[i, j]) == 0 else int(self.conflict[i, j]) / int(self.inter[i, j])
                for j in range(t)
            ]
            for i in range(t)
        ]
        overlap = []
        for i in range(t):
            row = []
            for j in range(t):
                small = min(self.topk_count[i], self.topk_count[j])
                row.append(None if i == j or small == 0 else int(self.inter[i, j]) / small)
            overlap.append(row)
        hist = [int(x) for x in self.hist]
        return {
            "parameters": self.numel,
            "tensors": self.tensors,
            "layers": [str(k) for k in layers],
            "layer_parameters": {str(k): self.layer_numel[k] for k in layers},
            "options": asdict(self.opts),
            "norms": {"total": norms, "per_layer": per_layer_norms},
            "cosine": {
                "matrix": self._cosines(self.gram),
                "per_layer": {str(k): self._cosines(self.layer_gram[k]) for k in layers},
            },
            "sign_conflict": {
                "topk": self.opts.topk,
                "topk_entries": list(self.topk_count),
                "intersection": [[int(x) for x in row] for row in self.inter],
                "conflicts": [[int(x) for x in row] for row in self.conflict],
                "rate": rate,
                "overlap": overlap,
                "all_experts_entries": self.multi,
                "all_experts_rate": self.multi_conflict / self.multi if self.multi else None,
            },
            "tall": {
                "lambda": self.opts.tall_lambda,
                "claimed": list(self.claimed),
                "claimed_fraction": [c / n for c in self.claimed],
                "selfish": list(self.selfish),
                "selfish_total": hist[1] if t >= 1 else 0,
                "catastrophic": hist[0],
                "untouched": self.untouched,
                "histogram": hist,
            },
            "density": {
                "nonzero": [c / n for c in self.nonzero],
                "ties": {"density": self.opts.ties_density, "kept": [c / n for c in self.ties_kept], "kind": "counted"},
                "breadcrumbs": {
                    "density": self.opts.breadcrumbs_density,
                    "gamma": self.opts.breadcrumbs_gamma,
                    "kept": [c / n for c in self.breadcrumbs_kept],
                    "kind": "counted",
                },
                "dare": {
                    "density": self.opts.dare_density,
                    "kept": [c / n for c in self.dare_expected],
                    "kind": "expected",
                },
                "della": {
                    "density": self.opts.della_density,
                    "epsilon": self.opts.della_epsilon,
                    "kept": [c / n for c in self.della_expected],
                    "kind": "expected",
                },
            },
        }
