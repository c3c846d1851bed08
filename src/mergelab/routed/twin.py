"""Twin-Merging: a shared merged model plus SVD-compressed exclusive vectors and a router.

Lu, Fan, Chen, Zhang, Ma, Wang, Zhou 2024, "Twin-Merging: Dynamic Integration of Modular
Expertise in Model Merging", NeurIPS, arXiv:2406.15479 (reference code LZY-the-boys/Twin-Merging,
``discriminative/twin_merge.py``, ``sparsify.py``, ``router.py``).

1. Shared expert θ* = any registered merge of the experts (default task arithmetic with λ = 0.3,
   the paper's generative setting; the discriminative scripts use 0.29; TIES as an option).
2. Exclusive vector of expert t, relative to the **merged** model: vₜ = θₜ − θ*.
3. Compression per matrix: the rank-r truncated SVD with r = ⌊d · min(m, n)⌋ (``density`` d,
   default 0.1: the reference's ``mask_rate`` 0.9); 1-D tensors (biases, norms) stay dense. r is 0
   for a matrix with min(m, n) < 1/d (with d = 0.1: a sequence-classification head with 2–9
   labels, BERT's 2-row token-type embedding): ``zero_rank: dense`` (default) stores such a
   matrix's expert value whole (``modules_to_save``), so each route keeps its own head;
   ``zero_rank: drop`` keeps θ*'s there for every route (what ⌊d · min(m, n)⌋ = 0 gives in the
   reference's SVD, whose runs never meet it for heads: it excludes ``.*classifier.*`` from merging
   and routing and evaluates with the ground-truth task's head, a task-id leak mergelab does not
   reproduce).
4. A router (MLP on the mean-pooled last hidden state of θ*, :mod:`mergelab.routed.router`) trained
   on up to 5,500 examples per expert (the reference's cap); the routing weights are
   ``softmax(logits)`` and the model of an input is θ* + Σₜ wₜ ṽₜ (here mixed in activation space,
   :mod:`mergelab.routed.layers`).
   The mixing is set in the recipe's ``router:`` block (``mixing: top1`` or ``topk`` with
   ``top_k``), not among these parameters.

Stored as factors, never as dense ṽₜ (the reference stores them dense): LoRA ``B = U_r S_r``,
``A = Vhᵣ``. Embedding matrices are compressed the same way (embedding LoRA); matrices of other
module types cannot be PEFT LoRA targets and are kept dense (``modules_to_save``), as are
matrices of rank 0 (``zero_rank: dense``, above).

Where mergelab departs from the reference code, on purpose:

* the reference drops every parameter matching ``.*classifier.*`` and ``.*bias.*`` from merging
  and routing, and then evaluates each example with those parameters taken from the
  **ground-truth task's** fine-tuned model, which leaks the task id into the reported numbers;
  mergelab routes biases and norms with the rest (dense), and has no such oracle;
* the reference selects the router checkpoint on rows of the *test* split; mergelab selects it on
  validation rows only (:mod:`mergelab.routed.router`);
* only the product-space mode is implemented: LoRA experts are read as their dense updates
  W0 + s·B·A and merged, compressed and mixed as any expert (the model of an input is
  θ* + Σ wₜ ṽₜ). The reference's generative (LoRA) pipeline, which gives the paper's Qwen-14B
  numbers, is factor-wise: A* = 0.3 ΣAₜ and B* = 0.3 ΣBₜ each on its own, ΔAₜ = Aₜ − A* and
  ΔBₜ = Bₜ − B* SVD-truncated to rank 8, and per prompt A = A* + Σ wₜ ΔAₜ, B = B* + Σ wₜ ΔBₜ, so the
  update (α/r)·B·A is not Σ wₜ BₜAₜ (it is quadratic in w). That mode is not implemented (there is
  no ``lora_mode`` parameter): to reproduce those numbers, this module's results are not the ones
  to compare.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergelab.lora.factors import LoraFactors
from mergelab.methods.kernels.linalg import thin_svd


class TwinParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    density: float = Field(
        0.1, gt=0.0, le=1.0, description="rank of each exclusive matrix = ⌊density · min(m, n)⌋ (reference: 0.1)"
    )
    shared_method: str = Field("task_arithmetic", description="the registered merge giving the shared model θ*")
    shared_parameters: dict[str, Any] | None = Field(
        None, description="its global parameters (default for task_arithmetic: lambda 0.3, the paper's)"
    )
    shared_model_parameters: dict[str, Any] = Field(
        default_factory=dict, description="its per-model parameters, the same for every expert"
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="regular expressions of tensor names kept out of the experts (every route uses θ* there)",
    )
    svd_dtype: Literal["float32", "float64"] = Field("float32", description="dtype of the SVDs")
    zero_rank: Literal["dense", "drop"] = Field(
        "dense",
        description="a matrix whose rank ⌊density · min(m, n)⌋ is 0 (a small classification head): stored whole "
        "per expert (dense, modules_to_save) or dropped (every route uses θ*'s)",
    )

    def shared_recipe_parameters(self) -> dict[str, Any]:
        if self.shared_parameters is not None:
            return dict(self.shared_parameters)
        return {"lambda": 0.3} if self.shared_method == "task_arithmetic" else {}


def twin_rank(shape: tuple[int, ...], density: float) -> int:
    """⌊density · min(m, n)⌋ (the reference's ``int(density * len(S))``)."""
    return int(density * min(shape))


def compress(delta: torch.Tensor, rank: int, svd_dtype: torch.dtype = torch.float32) -> LoraFactors | None:
    """The rank-``rank`` truncated SVD of ``delta`` (``out × in``) as LoRA factors; None for rank 0 or a
    zero update."""
    if rank <= 0 or not bool(delta.any()):
        return None
    u, s, vh = thin_svd(delta.to(svd_dtype))
    r = min(rank, s.numel())
    return LoraFactors(vh[:r].float().contiguous(), (u[:, :r] * s[:r]).float().contiguous(), 1.0)
