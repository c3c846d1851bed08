"""``RoutedModel``: a routed-model folder as one ``nn.Module`` (router + shared model + experts).

:meth:`RoutedModel.from_pretrained` loads either layout mergelab writes:

* a routed-model folder (``twin_merging``, ``split_merge``, ``smile``, ``wemoe``;
  :mod:`mergelab.routed.bundle`): ``shared/`` with transformers, each ``experts/<name>/`` adapter
  as per-module deltas (:func:`mergelab.routed.adapters.read_expert`), ``router/``;
* a TALL-masks / EMR output (:mod:`mergelab.routed.format`): the shared checkpoint, each task's
  reconstruction θ̂ₜ − shared as dense deltas, and ``routed/router/`` when the merge trained one
  (otherwise the route must be given: :meth:`RoutedModel.fixed_route`).

Every layer any expert changes is replaced by a routed layer (:mod:`mergelab.routed.layers`)
that adds ``Σₜ wₜ · updateₜ(x)`` to the shared layer's output, so rows (and, for SMILE, tokens)
with different routes run in one pass. Where the weights come from depends on the router:

* ``sequence_mlp`` (Twin-Merging, Split-Merge, routed TALL/EMR): before the forward, the shared
  model alone runs on the input (``state.active = False``) as the router was trained: on each
  row's first ``max_length`` real tokens, right-padded, in the router's ``feature_dtype``
  (float32; a model loaded in another dtype keeps a float32 copy of the shared model for this, or
  pass ``router_dtype``); its last hidden state is mean-pooled over real tokens and the router
  gives ``[batch, experts]`` weights. During ``generate`` the
  route is computed on the prompt (the first forward, empty cache) and kept for the decoding
  steps; beams and returned sequences of one prompt share its route;
* ``smile``: every routed linear layer routes each token from its own input;
* ``wemoe``: every feed-forward block computes per-sequence coefficients from its input
  (masked mean over tokens) for its linear layers; computed on the prompt during ``generate``.

:meth:`RoutedModel.fixed_route` (a context manager) forces the weights (a one-hot route gives the
expert's reconstruction: the model PEFT builds from ``shared/`` + ``experts/<name>/``).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergelab.errors import CheckpointError, OptionError
from mergelab.routed.adapters import ExpertDelta, read_expert
from mergelab.routed.layers import (
    BlockSlot,
    RoutedAffine,
    RoutedEmbedding,
    RoutedLinear,
    RouteState,
    SmileGate,
    WemoeGate,
)
from mergelab.routed.router import (
    FEATURE_DTYPE,
    body_features,
    build_sequence_router,
    load_router,
    mixing_weights,
    model_body,
)
from mergelab.routed.structure import ModuleKind, module_kind


class RoutedModel(nn.Module):
    """A routed model (see the module docstring). ``model`` is the transformers model with routed
    layers; ``forward`` and ``generate`` take what that model takes."""

    def __init__(
        self,
        model: nn.Module,
        experts: Sequence[str],
        state: RouteState,
        *,
        router: nn.Module | None = None,
        router_config: Mapping[str, Any] | None = None,
        manifest: Mapping[str, Any] | None = None,
        gates: nn.ModuleDict | None = None,
        slots: Mapping[str, BlockSlot] | None = None,
        kind: str = "encoder",
        router_body: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.router_body = router_body  # the shared model's body in the router's feature dtype (None: self.model)
        self.experts = list(experts)
        self.state = state
        self.router = router
        self.router_config = dict(router_config or {})
        self.manifest = dict(manifest or {})
        self.gates = gates
        self.slots = dict(slots or {})
        self.kind = kind
        self._fixed: torch.Tensor | None = None
        self._in_prepass = False
        self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._gate_hooks: list[Any] = []
        self._setup_gate_hooks()

    # ----------------------------------------------------------------------------------------
    # loading

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike[str],
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        kind: str = "auto",
        router_dtype: torch.dtype | None = None,
    ) -> RoutedModel:
        """Load a routed-model folder or a TALL-masks / EMR output (see the module docstring).

        ``kind``: how to load the shared checkpoint: ``auto`` (from config.json's architectures),
        ``causal_lm``, ``sequence_classification`` or ``encoder`` (``AutoModel``).
        ``router_dtype``: the dtype the sequence router's prepass runs in (default: the one its
        features were trained in, ``feature_dtype`` of its config, float32); when it is not
        ``dtype``, a second copy of the shared model is loaded in it for the prepass (memory: the
        shared model in that dtype). ``router_dtype=dtype`` shares the routed model instead, at the
        price of features the router was not trained on."""
        from mergelab.routed.bundle import is_bundle
        from mergelab.routed.format import is_routed

        path = Path(folder).expanduser()
        if is_bundle(path):
            model = _load_bundle(path, kind, dtype, router_dtype)
        elif is_routed(path):
            model = _load_masks(path, kind, dtype, router_dtype)
        else:
            raise CheckpointError(
                f"{path}: not a routed model (no manifest.json of a routed-model folder, no routed/manifest.json of "
                "a tall_masks / emr merge); write one with `mergelab merge`"
            )
        return model.to(device).eval()

    # ----------------------------------------------------------------------------------------
    # routing

    @property
    def granularity(self) -> str:
        return str(self.router_config.get("granularity", "sequence"))

    @contextlib.contextmanager
    def fixed_route(self, weights: torch.Tensor | Sequence[float] | int | str) -> Iterator[None]:
        """Force the routing weights: an expert (index or name: one-hot), a vector ``[T]`` for every
        row, or ``[batch, T]`` per row. Local gates (SMILE, WEMoE) are bypassed too."""
        w = self._as_weights(weights)
        prev = self._fixed
        self._fixed = w
        try:
            yield
        finally:
            self._fixed = prev

    def _as_weights(self, weights: torch.Tensor | Sequence[float] | int | str) -> torch.Tensor:
        t = len(self.experts)
        if isinstance(weights, str):
            if weights not in self.experts:
                raise OptionError(f"unknown expert {weights!r}; this routed model has {self.experts}")
            weights = self.experts.index(weights)
        if isinstance(weights, int):
            if not 0 <= weights < t:
                raise OptionError(f"expert index {weights} out of range for {t} experts")
            return torch.nn.functional.one_hot(torch.tensor(weights), t).float()
        w = torch.as_tensor(weights)
        if not w.is_floating_point():
            w = w.float()
        if w.shape[-1] != t or w.dim() not in (1, 2):
            raise OptionError(f"routing weights of shape {list(w.shape)}: expected [{t}] or [batch, {t}]")
        return w

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """The routing weights ``[batch, experts]`` of a sequence router for these inputs."""
        if self.router is None:
            if self.router_config.get("kind") in ("smile", "wemoe"):
                raise OptionError(
                    f"{self.router_config['kind']} routes inside the layers; read model.last_route after a forward"
                )
            raise OptionError("this routed model has no router: give the route with fixed_route(...)")
        return self._sequence_weights(input_ids, attention_mask, kwargs)

    def router_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The sequence router's logits for these inputs."""
        if self.router is None:
            raise OptionError("this routed model has no sequence router")
        return self._logits(input_ids, attention_mask, {})

    @property
    def last_route(self) -> torch.Tensor | None:
        """The per-sequence weights of the last forward: the sequence router's, the fixed route, or
        for layer-local gates their mean over layers (and tokens)."""
        if self.state.records:
            mask = self.state.token_mask
            ws = []
            for w in self.state.records:
                if w.dim() == 3:  # per token: the mean over the real tokens
                    if mask is not None and tuple(mask.shape) == tuple(w.shape[:2]):
                        m = mask.to(w.dtype).unsqueeze(-1)
                        w = (w * m).sum(1) / m.sum(1).clamp_min(1.0)
                    else:
                        w = w.mean(dim=1)
                if w.dim() == 2:
                    ws.append(w)
            return torch.stack(ws).mean(0) if ws else None
        return self.state.weights

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor | None, extra: Mapping[str, Any]) -> torch.Tensor:
        """The router's logits: its features computed as in training (:func:`mergelab.routed.router.body_features`:
        the first ``max_length`` real tokens of each row, right-padded, in the feature dtype)."""
        assert self.router is not None
        cfg = self.router_config
        max_length = cfg.get("max_length", (cfg.get("training") or {}).get("max_length"))
        tt = extra.get("token_type_ids")
        if self.router_body is not None:
            feats = body_features(self.router_body, ids, mask, tt, max_length)
        else:
            self._in_prepass = True
            try:
                with self.state.inactive():
                    feats = body_features(model_body(self.model), ids, mask, tt, max_length)
            finally:
                self._in_prepass = False
        router_dev = next(self.router.parameters()).device
        return self.router(feats.to(router_dev)).to(ids.device)

    def _sequence_weights(self, ids: torch.Tensor, mask: torch.Tensor | None, extra: Mapping[str, Any]) -> torch.Tensor:
        cfg = self.router_config
        with torch.no_grad():
            logits = self._logits(ids, mask, extra)
        return mixing_weights(
            logits, str(cfg.get("mixing", "softmax")), float(cfg.get("temperature", 1.0)), cfg.get("top_k")
        )

    def _before_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._in_prepass:
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        st = self.state
        decoding = _cache_len(_cache_of(kwargs)) > 0
        batch = ids.shape[0] if isinstance(ids, torch.Tensor) else None
        if not decoding:
            st.token_mask = mask
            st.records = []
            st.record = True
        else:
            st.record = False
        st.forced = self._fixed is not None
        if self._fixed is not None:
            w = self._fixed
            if w.dim() == 1 and batch is not None:
                w = w.unsqueeze(0).expand(batch, -1)
            device = ids.device if isinstance(ids, torch.Tensor) else None
            st.weights = w.to(device) if device is not None else w
            for slot in self.slots.values():
                slot.weights = st.weights
            return
        if self.router is None:
            if self.router_config.get("kind") not in ("smile", "wemoe"):
                raise OptionError(
                    "this routed model has no router (a tall_masks / emr merge without `router:`): "
                    "give the route with `with model.fixed_route(task): ...`"
                )
            return
        if decoding and st.weights is not None and batch is not None and st.weights.shape[0] == batch:
            return  # generate: keep the prompt's route
        if ids is None:
            raise OptionError("the sequence router reads input_ids; inputs_embeds alone cannot be routed")
        st.weights = self._sequence_weights(ids, mask, kwargs)

    # ----------------------------------------------------------------------------------------
    # WEMoE gates: computed on the block's input before its layers run

    def _setup_gate_hooks(self) -> None:
        if self.gates is None or not self.slots:
            return
        modules = dict(self.model.named_modules())
        for block, slot in self.slots.items():
            gate = self.gates[_key(block)]
            hook = modules[block].register_forward_pre_hook(self._gate_hook(gate, slot))
            self._gate_hooks.append(hook)

    def _gate_hook(self, gate: nn.Module, slot: BlockSlot) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            st = self.state
            if not st.active:
                return
            if self._fixed is not None:
                return  # slot weights were set from the fixed route
            if not st.record and slot.weights is not None:
                return  # decoding: keep the prompt's coefficients
            x = args[0]
            w = gate(x, st.token_mask)
            if self.router_config.get("batch_reduce"):
                w = w.mean(dim=0, keepdim=True).expand(x.shape[0], -1)
            slot.weights = w
            st.records.append(w.detach())

        return hook

    # ----------------------------------------------------------------------------------------
    # running

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``generate`` of the wrapped causal LM (routes computed on the prompt, see the module docstring)."""
        gen = getattr(self.model, "generate", None)
        if gen is None:
            raise OptionError(f"{type(self.model).__name__} has no generate (load a causal LM)")
        return gen(*args, **kwargs)

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _cache_of(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache of a forward call (``past_key_values``; transformers 5 generate passes ``cache``)."""
    past = kwargs.get("past_key_values")
    return past if past is not None else kwargs.get("cache")


def _cache_len(past: Any) -> int:
    if past is None:
        return 0
    fn = getattr(past, "get_seq_length", None)
    if callable(fn):
        try:
            return int(fn())
        except Exception:  # caches of other layouts
            return 0
    if isinstance(past, (tuple, list)) and past and isinstance(past[0], (tuple, list)) and past[0]:
        return int(past[0][0].shape[-2])
    return 0


def _key(name: str) -> str:
    return name.replace(".", "__")


# --------------------------------------------------------------------------------------------
# construction


def _load_shared(folder: Path, kind: str, dtype: torch.dtype) -> tuple[nn.Module, str]:
    from mergelab.informed.modeling import detect_kind, load_model, read_config

    k = detect_kind(read_config(folder), kind)
    return load_model(folder, k, torch.device("cpu"), dtype), k


def _param_index(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, tuple[str, str]]]:
    params: dict[str, torch.Tensor] = {}
    owner: dict[str, tuple[str, str]] = {}
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if full not in params:
                params[full] = p
                owner[full] = (mname, pname)
    return params, owner


def _tied_heads(model: nn.Module) -> dict[str, str]:
    """Modules whose weight is the same tensor as an earlier module's (a tied output head)."""
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and not any(True for _ in mod.children()):
            if id(w) in seen and seen[id(w)] != mname:
                tied[mname] = seen[id(w)]
            else:
                seen.setdefault(id(w), mname)
    return tied


def _wrap(
    model: nn.Module,
    deltas: Sequence[Mapping[str, ExpertDelta]],
    state: RouteState,
    *,
    gates: Mapping[str, nn.Module] | None = None,
    slots: Mapping[str, BlockSlot] | None = None,
) -> None:
    """Replace every module some expert changes by its routed layer (tied heads follow their embedding)."""
    names = sorted({m for d in deltas for m in d})
    tied = _tied_heads(model)
    modules = dict(model.named_modules())
    for head, emb in tied.items():  # a tied output head gets its embedding's update, transposed
        if emb in names:
            for d in deltas:
                e = d.get(emb)
                if e is None:
                    continue
                head_delta = ExpertDelta()
                if e.lora is not None:
                    from mergelab.lora.factors import LoraFactors

                    head_delta.lora = LoraFactors(e.lora.B.T, e.lora.A.T, e.lora.scaling)
                if "weight" in e.dense:
                    head_delta.dense["weight"] = e.dense["weight"]
                d[head] = head_delta  # type: ignore[index]
            if head not in names:
                names.append(head)
    for name in names:
        mod = modules[name]
        per_expert = [d.get(name) for d in deltas]
        kind: ModuleKind = module_kind(mod)
        if kind in ("linear", "conv1d"):
            new: nn.Module = RoutedLinear(
                mod,
                per_expert,
                state,
                transposed=kind == "conv1d",
                gate=(gates or {}).get(name),
                slot=(slots or {}).get(name),
            )
        elif kind == "embedding":
            assert isinstance(mod, nn.Embedding)
            new = RoutedEmbedding(mod, per_expert, state)
        elif kind == "norm":
            new = RoutedAffine(mod, per_expert, state)
        else:
            raise CheckpointError(
                f"module {name!r} ({type(mod).__name__}) has per-expert parameters but is neither a linear layer, an "
                "embedding nor a normalisation layer: it cannot be mixed in activation space"
            )
        _set_module(model, name, new)


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _check_router_classes(cfg: Mapping[str, Any], experts: Sequence[str], where: Path) -> None:
    classes = list(cfg.get("classes") or [])
    if classes != list(experts):
        raise CheckpointError(
            f"{where}: the router's classes {classes} are not the experts {list(experts)} of the manifest; "
            "rebuild the routed model (mergelab merge) or restore the matching router"
        )


def _router_body(
    shared: Path, kind: str, cfg: Mapping[str, Any], dtype: torch.dtype, router_dtype: torch.dtype | None
) -> nn.Module | None:
    """The shared model's body in the dtype the sequence router's features were computed in, when
    that is not the routed model's own ``dtype`` (None: the routed model runs the prepass)."""
    want = router_dtype
    if want is None:
        name = str(cfg.get("feature_dtype", FEATURE_DTYPE))
        want = getattr(torch, name, None)
        if not isinstance(want, torch.dtype):
            raise CheckpointError(f"{shared}: router feature_dtype {name!r} is not a torch dtype")
    if want == dtype:
        return None
    model, _ = _load_shared(shared, kind, want)
    body = model_body(model)
    for p in body.parameters():
        p.requires_grad_(False)
    return body.eval()


def _load_bundle(folder: Path, kind: str, dtype: torch.dtype, router_dtype: torch.dtype | None = None) -> RoutedModel:
    from mergelab.routed.bundle import ROUTER, SHARED, read_bundle_manifest

    manifest = read_bundle_manifest(folder)
    names = [e["name"] for e in manifest["experts"]]
    model, k = _load_shared(folder / SHARED, kind, dtype)
    params, owner = _param_index(model)
    tied = _tied_heads(model)
    conv1d = {n for n, m in model.named_modules() if module_kind(m) == "conv1d"}
    deltas = [read_expert(folder / e["adapter"], params.get, owner, tied, conv1d) for e in manifest["experts"]]
    router_dir = folder / ROUTER
    tensors, cfg = load_router(router_dir)
    _check_router_classes(cfg, names, router_dir)
    state = RouteState()
    router_kind = cfg.get("kind")
    router: nn.Module | None = None
    gates = None
    slots: dict[str, BlockSlot] = {}
    layer_gates: dict[str, nn.Module] = {}
    router_body = None
    if router_kind == "sequence_mlp":
        router = build_sequence_router(tensors, cfg, router_dir)
        router_body = _router_body(folder / SHARED, k, cfg, dtype, router_dtype)
    elif router_kind == "smile":
        for key, g in tensors.items():
            if not key.startswith("gate."):
                continue
            module = key[len("gate.") :]
            if g.dim() != 3 or g.shape[0] != len(names):
                raise CheckpointError(
                    f"{router_dir}: gate {key!r} has shape {list(g.shape)}, expected [{len(names)}, k, in]"
                )
            layer_gates[module] = SmileGate(g.to(dtype), int(cfg.get("top_k") or 1))
        missing = [
            m
            for d in deltas
            for m in d
            if m not in layer_gates and module_kind(model.get_submodule(m)) in ("linear", "conv1d")
        ]
        if missing:
            raise CheckpointError(
                f"{router_dir}: no SMILE gate for routed layer {missing[0]!r}; the router is incomplete"
            )
    elif router_kind == "wemoe":
        gates, slots = _wemoe_gates(model, tensors, cfg, deltas, router_dir, dtype)
    else:
        raise CheckpointError(f"{router_dir}: unknown router kind {router_kind!r} (sequence_mlp, smile, wemoe)")
    if router_kind == "wemoe":
        _wemoe_rebase(model, deltas, tensors, router_dir)
    layer_slots = {lin: slot for block, slot in slots.items() for lin in cfg["blocks"][block]} if slots else {}
    _wrap(model, deltas, state, gates=layer_gates, slots=layer_slots)
    out = RoutedModel(
        model,
        names,
        state,
        router=router,
        router_config=cfg,
        manifest=manifest,
        gates=gates,
        slots=slots,
        kind=k,
        router_body=router_body,
    )
    return out


def _wemoe_gates(
    model: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    cfg: Mapping[str, Any],
    deltas: Sequence[Mapping[str, ExpertDelta]],
    where: Path,
    dtype: torch.dtype,
) -> tuple[nn.ModuleDict, dict[str, BlockSlot]]:
    blocks: Mapping[str, Sequence[str]] = cfg.get("blocks") or {}
    if not blocks:
        raise CheckpointError(f"{where}: the wemoe router lists no blocks")
    gates = nn.ModuleDict()
    slots: dict[str, BlockSlot] = {}
    hidden = int(cfg["hidden_size"])
    for block in blocks:
        gate = WemoeGate(hidden, len(cfg["classes"]), int(cfg.get("depth", 2)), float(cfg.get("init_lambda", 0.3)))
        prefix = f"gate.{block}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            gate.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(
                f"{where}: gate of block {block!r} does not fit ({str(exc).splitlines()[0][:120]})"
            ) from None
        gates[_key(block)] = gate.to(dtype)
        slots[block] = BlockSlot()
    return gates, slots


def _wemoe_rebase(
    model: nn.Module, deltas: Sequence[Mapping[str, ExpertDelta]], tensors: Mapping[str, torch.Tensor], where: Path
) -> None:
    """WEMoE mixes θ0 + Σ λₜ τₜ in each block: the routed layers' shared part becomes the base
    block (``router/``'s ``base.<param>``), each expert's update θₜ − θ0 (= its adapter's delta
    relative to the shared model + shared − θ0), every term in the stored tensor's layout (a GPT-2
    ``Conv1D`` stores ``in × out``; its LoRA factors give ``out × in``: ``stored_delta``)."""
    params = dict(model.named_parameters())
    for key, base in tensors.items():
        if not key.startswith("base."):
            continue
        name = key[len("base.") :]
        if name not in params:
            raise CheckpointError(f"{where}: base tensor {name!r} is not a parameter of the shared model")
        p = params[name]
        module, _, pname = name.rpartition(".")
        shift = p.detach().float() - base.float()  # shared − θ0
        for d in deltas:
            e = d.get(module)
            if e is None:
                e = ExpertDelta()
                d[module] = e  # type: ignore[index]
            if e.lora is not None and pname == "weight":
                dense = e.lora.stored_delta(torch.float32)
                e.dense["weight"] = e.dense.get("weight", torch.zeros_like(dense)) + dense
                e.lora = None
            e.dense[pname] = e.dense.get(pname, torch.zeros_like(shift)) + shift
        with torch.no_grad():
            p.copy_(base.to(p.dtype))


def _load_masks(folder: Path, kind: str, dtype: torch.dtype, router_dtype: torch.dtype | None = None) -> RoutedModel:
    """A TALL-masks / EMR output: experts are the tasks' reconstructions, as dense deltas."""
    from mergelab.routed.extract import iter_task_tensors
    from mergelab.routed.format import read_manifest, routed_dir

    manifest = read_manifest(folder)
    names = [t["name"] for t in manifest["tasks"]]
    routed = set(manifest["routed_tensors"])
    model, k = _load_shared(folder, kind, dtype)
    from mergelab.informed.modeling import checkpoint_names

    params, owner = _param_index(model)
    to_ckpt = checkpoint_names(model, routed | set(params))
    from_ckpt = {c: m for m, c in to_ckpt.items()}
    deltas: list[dict[str, ExpertDelta]] = []
    for t in range(len(names)):
        d: dict[str, ExpertDelta] = {}
        for name, value in iter_task_tensors(folder, t):
            if name not in routed or name not in from_ckpt:
                continue
            pname_full = from_ckpt[name]
            p = params[pname_full]
            delta = value.float() - p.detach().float()
            if not bool(delta.any()):
                continue
            module, pname = owner[pname_full]
            d.setdefault(module, ExpertDelta()).dense[pname] = delta
        deltas.append(d)
    state = RouteState()
    router: nn.Module | None = None
    cfg: dict[str, Any] = {"kind": "none", "classes": names, "mixing": "top1", "granularity": "sequence"}
    rdir = routed_dir(folder) / "router"
    router_body = None
    if (rdir / "router_config.json").is_file():
        tensors, cfg = load_router(rdir)
        _check_router_classes(cfg, names, rdir)
        router = build_sequence_router(tensors, cfg, rdir)
        router_body = _router_body(folder, k, cfg, dtype, router_dtype)
    _wrap(model, deltas, state)
    return RoutedModel(
        model, names, state, router=router, router_config=cfg, manifest=manifest, kind=k, router_body=router_body
    )


def read_router_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The router config of a routed-model folder or a routed TALL/EMR output ({} when it has none)."""
    from mergelab.routed.bundle import ROUTER, ROUTER_CONFIG, is_bundle
    from mergelab.routed.format import routed_dir

    path = Path(folder)
    p = path / ROUTER / ROUTER_CONFIG if is_bundle(path) else routed_dir(path) / "router" / ROUTER_CONFIG
    return json.loads(p.read_text()) if p.is_file() else {}
