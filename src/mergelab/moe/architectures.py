"""Mixture-of-experts output architectures as data: tensor names, config keys, accepted dense bases.

One :class:`MoeArchitecture` per MoE family that transformers loads natively. Everything the
upcycler and the compressor need to know about a family is a field here, so a new family is one
more entry in :data:`ARCHITECTURES`, not a code path.

Tensor layout. Every family is written with **one tensor per expert and projection**
(``model.layers.3.block_sparse_moe.experts.5.w1.weight``, ``model.layers.3.mlp.experts.5.gate_proj.weight``):
the layout ``save_pretrained`` itself writes in the installed transformers (5.x keeps the experts fused
as 3-D ``mlp.experts.gate_up_proj`` / ``down_proj`` parameters in memory and converts to and from the
per-expert layout when saving and loading), and the one mergekit-moe, vLLM and older transformers read.

Dense bases. An MoE layer replaces the dense MLP ``model.layers.N.mlp.{gate,up,down}_proj.weight``
of a Llama-style decoder: each expert's MLP becomes one routed expert, every other tensor comes from
the base. ``dense_types`` lists the base families whose attention the output family computes the
same way (Mixtral has no attention biases, so a Qwen2 base cannot become Mixtral; Qwen2-MoE always
has q/k/v biases, so a Llama base gets zero biases, which changes nothing).

DeepSeek-MoE (mergekit-moe's ``deepseek`` output) is not here: the installed transformers has
DeepSeek-V2/V3 (multi-head latent attention, whose projections a Llama-style base does not have) but
not the DeepSeek-MoE v1 model, which loads only with remote code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mergelab.errors import PlanError, RecipeError

DENSE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
"""The dense SwiGLU MLP's projections, in the order gate (activated), up, down."""

DENSE_MLP = "model.layers.{layer}.mlp.{proj}.weight"
"""A dense decoder layer's MLP weight (Llama, Mistral, Qwen2, Qwen3)."""

_DENSE_MLP_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.(weight|bias)$")


def dense_mlp_tensor(name: str) -> tuple[int, str, str] | None:
    """``(layer, projection, weight|bias)`` when ``name`` is a dense MLP tensor of a decoder layer."""
    m = _DENSE_MLP_RE.match(name)
    return (int(m[1]), m[2], m[3]) if m else None


@dataclass(frozen=True)
class MoeArchitecture:
    """How one MoE family names its tensors and config keys.

    Names are format strings over ``layer``, ``expert`` and ``proj`` (the family's own projection
    name, from ``projections``).
    """

    name: str
    """What recipes and options call it (``architecture: mixtral``)."""
    model_type: str
    """config.json's ``model_type`` (and the transformers config class)."""
    class_name: str
    """config.json's ``architectures`` entry."""
    dense_types: tuple[str, ...]
    """``model_type`` of the dense bases it can be built from."""
    expert: str
    """One routed expert's projection weight."""
    router: str
    """A layer's router (gate) weight, ``[num_experts, hidden]``."""
    projections: Mapping[str, str]
    """Dense projection name -> this family's name for it inside an expert."""
    count_key: str
    """The config key of the number of routed experts per layer."""
    topk_key: str = "num_experts_per_tok"
    intermediate_keys: tuple[str, ...] = ()
    """Config keys set to the dense MLP's ``intermediate_size`` (the experts' width)."""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    """Config keys with fixed values (every layer sparse, normalised top-k weights)."""
    shared_expert: str | None = None
    """The shared (always-on) expert's projection weight, for families that have exactly one."""
    shared_gate: str | None = None
    """The shared expert's sigmoid gate weight ``[1, hidden]``."""
    attention_biases: str = "none"
    """Which attention biases the family loads: ``none`` (a base with any is refused), ``qkv``
    (always q/k/v biases: zeros are written for a base without; an o_proj bias is refused) or
    ``config`` (as the base's ``attention_bias``, the same attention class)."""
    modules: tuple[str, ...] = ("model.layers.{layer}.mlp",)
    """Where transformers puts a layer's sparse MoE block (module paths, first found wins)."""

    def expert_name(self, layer: int, expert: int, proj: str) -> str:
        """The output name of expert ``expert``'s dense projection ``proj`` (``gate_proj``...)."""
        return self.expert.format(layer=layer, expert=expert, proj=self.projections[proj])

    def router_name(self, layer: int) -> str:
        return self.router.format(layer=layer)

    def shared_name(self, layer: int, proj: str) -> str:
        assert self.shared_expert is not None
        return self.shared_expert.format(layer=layer, proj=proj)

    def shared_gate_name(self, layer: int) -> str:
        assert self.shared_gate is not None
        return self.shared_gate.format(layer=layer)

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert is not None

    def expert_pattern(self) -> re.Pattern[str]:
        """Matches this family's routed-expert tensor names: groups ``layer``, ``expert``, ``proj``."""
        inverse = "|".join(re.escape(v) for v in self.projections.values())
        pat = re.escape(self.expert).replace(r"\{layer\}", r"(?P<layer>\d+)")
        pat = pat.replace(r"\{expert\}", r"(?P<expert>\d+)").replace(r"\{proj\}", f"(?P<proj>{inverse})")
        return re.compile(f"^{pat}$")

    def dense_projection(self, own: str) -> str:
        """This family's projection name -> the dense name (``w1`` -> ``gate_proj``)."""
        for dense, mine in self.projections.items():
            if mine == own:
                return dense
        raise KeyError(own)


MIXTRAL = MoeArchitecture(
    name="mixtral",
    model_type="mixtral",
    class_name="MixtralForCausalLM",
    dense_types=("llama", "mistral"),
    expert="model.layers.{layer}.block_sparse_moe.experts.{expert}.{proj}.weight",
    router="model.layers.{layer}.block_sparse_moe.gate.weight",
    projections={"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"},
    count_key="num_local_experts",
    modules=("model.layers.{layer}.mlp", "model.layers.{layer}.block_sparse_moe"),
)
"""Mixtral: softmax router, top-k weights renormalised, no shared expert, no attention biases."""

QWEN2_MOE = MoeArchitecture(
    name="qwen2_moe",
    model_type="qwen2_moe",
    class_name="Qwen2MoeForCausalLM",
    dense_types=("qwen2", "llama", "mistral"),
    expert="model.layers.{layer}.mlp.experts.{expert}.{proj}.weight",
    router="model.layers.{layer}.mlp.gate.weight",
    projections={"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
    count_key="num_experts",
    intermediate_keys=("moe_intermediate_size", "shared_expert_intermediate_size"),
    fixed={"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    shared_expert="model.layers.{layer}.mlp.shared_expert.{proj}.weight",
    shared_gate="model.layers.{layer}.mlp.shared_expert_gate.weight",
    attention_biases="qkv",
)
"""Qwen2-MoE (Qwen1.5-MoE): routed experts plus exactly one shared expert behind a sigmoid gate."""

QWEN3_MOE = MoeArchitecture(
    name="qwen3_moe",
    model_type="qwen3_moe",
    class_name="Qwen3MoeForCausalLM",
    dense_types=("qwen3",),
    expert="model.layers.{layer}.mlp.experts.{expert}.{proj}.weight",
    router="model.layers.{layer}.mlp.gate.weight",
    projections={"gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"},
    count_key="num_experts",
    intermediate_keys=("moe_intermediate_size",),
    fixed={"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": True},
    attention_biases="config",
)
"""Qwen3-MoE: Qwen3 attention (q/k norms), routed experts only."""

ARCHITECTURES: dict[str, MoeArchitecture] = {a.name: a for a in (MIXTRAL, QWEN2_MOE, QWEN3_MOE)}

_ALIASES = {"qwen": "qwen2_moe", "qwen_moe": "qwen2_moe", "qwen2": "qwen2_moe", "qwen3": "qwen3_moe"}
"""mergekit-moe selects an output by prefix of its display name ("Mixtral", "Qwen MoE", "Qwen3 MoE")."""


def by_name(name: str) -> MoeArchitecture:
    """The family a recipe's ``architecture:`` names (mergekit's spellings accepted)."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    if key not in ARCHITECTURES:
        raise RecipeError(
            f"architecture {name!r} is not an MoE output mergelab writes; use one of {', '.join(ARCHITECTURES)}"
        )
    return ARCHITECTURES[key]


def select_output(
    requested: str | None, base_type: str | None, *, shared_experts: int, where: str = "recipe"
) -> MoeArchitecture:
    """The output family for a dense base of ``base_type``: the requested one, else mergekit-moe's choice.

    mergekit-moe tries every family that accepts the inputs and prefers Mixtral; Qwen2-MoE is the
    only one with a shared expert, and Qwen3 bases only fit Qwen3-MoE.
    """
    if requested is not None:
        arch = by_name(requested)
        candidates = [arch]
    else:
        candidates = list(ARCHITECTURES.values())
    problems: list[str] = []
    for arch in candidates:
        if base_type not in arch.dense_types:
            problems.append(f"{arch.name} is built from {'/'.join(arch.dense_types)} bases, not {base_type!r}")
            continue
        if arch.has_shared_expert and shared_experts != 1:
            problems.append(f"{arch.name} needs exactly one shared expert (shared_experts has {shared_experts})")
            continue
        if not arch.has_shared_expert and shared_experts:
            problems.append(f"{arch.name} has no shared expert (remove shared_experts)")
            continue
        return arch
    raise RecipeError(f"{where}: no MoE output fits: {'; '.join(problems)}")


def detect(config: Mapping[str, Any] | None, label: str) -> MoeArchitecture:
    """The family of an existing MoE checkpoint from its config.json ``model_type``."""
    model_type = (config or {}).get("model_type")
    for arch in ARCHITECTURES.values():
        if arch.model_type == model_type:
            return arch
    raise PlanError(
        f"{label}: model_type {model_type!r} is not an MoE family mergelab reads "
        f"({', '.join(a.model_type for a in ARCHITECTURES.values())}); give a Mixtral, Qwen2-MoE or Qwen3-MoE "
        "checkpoint"
    )
