"""Mixture-of-experts jobs on experts that share a base.

* :func:`upcycle` builds an MoE from dense fine-tunes (mergekit-moe's recipe format and gate modes):
  each expert's MLP becomes a routed expert, everything else comes from the base
  (:mod:`mergelab.moe.upcycling`, ``mergelab moe``).
* :func:`compress` shrinks an MoE by merging its experts (M-SMoE, Li et al., ICLR 2024; Sub-MoE,
  Li, Zhu et al., AAAI 2026, experimental) or pruning the least used ones, from the routing
  statistics of calibration data (:mod:`mergelab.moe.compression`, ``mergelab moe-compress``).

Output families (Mixtral, Qwen2-MoE, Qwen3-MoE) are data in :mod:`mergelab.moe.architectures`.
"""

from mergelab.moe.compression import CompressResult, compress
from mergelab.moe.recipe import MoeExpert, MoeRecipe, load_moe_recipe
from mergelab.moe.upcycling import UpcycleResult, upcycle

__all__ = [
    "CompressResult",
    "MoeExpert",
    "MoeRecipe",
    "UpcycleResult",
    "compress",
    "load_moe_recipe",
    "upcycle",
]
