"""One LoRA module's low-rank update, the unit every adapter reader, combiner and writer shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraFactors:
    """A LoRA module's update in PEFT's orientation (Hu et al. 2021, "LoRA"): ``ΔW = scaling · B @ A``.

    ``A`` is ``r × in`` and ``B`` is ``out × r`` exactly as PEFT stores ``lora_A`` / ``lora_B`` for a
    ``Linear`` (for embedding LoRA, PEFT's ``lora_embedding_A`` is ``r × num_embeddings`` and
    ``lora_embedding_B`` ``dim × r``). ``scaling`` is the factor PEFT applies (``lora_alpha / r``,
    ``lora_alpha / sqrt(r)`` with rsLoRA, per-module patterns resolved). ``transposed`` says that the
    checkpoint stores the weight as the transpose of ``B @ A`` (GPT-2 ``Conv1D`` with
    ``fan_in_fan_out``, embeddings), so the update of the *stored* tensor is :meth:`stored_delta`.
    """

    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    transposed: bool = False

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``scaling · B @ A`` (``out × in``) in ``dtype``."""
        return (self.B.to(dtype) @ self.A.to(dtype)) * self.scaling

    def stored_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The update in the checkpoint tensor's own layout (transposed where ``transposed``)."""
        d = self.delta(dtype)
        return d.T.contiguous() if self.transposed else d
