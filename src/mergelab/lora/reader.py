"""A PEFT LoRA adapter read as the full fine-tune it stands for: ``W = W0 + s·B·A``, per tensor, lazily.

:class:`AdapterReader` implements :class:`~mergelab.checkpoint.reader.CheckpointReader` over a base
reader and an adapter folder, so every merge method reads an adapter exactly as it reads a full
fine-tune, one tensor at a time (the same bounded memory: one module's factors beside the tensor).

What ``read(name)`` returns (PEFT's ``merge_and_unload``, Hu et al. 2021, "LoRA"):

* a LoRA'd weight: ``W0 + scaling · B @ A`` in the stored tensor's layout (transposed for GPT-2
  ``Conv1D`` and for embeddings), where ``W0`` is the base's tensor, or the adapter's own copy of the
  base layer (``<module>.base_layer.weight``, which PEFT saves for targeted embeddings);
* DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), ``Linear`` modules only:
  ``m / ||W0 + ΔW||_row · (W0 + ΔW)`` with the norm over each output row, as PEFT merges it;
* ``lora_bias``: the module's bias ``b0 + scaling · lora_B.bias``;
* ``modules_to_save`` (and biases trained with ``bias: all | lora_only``): the adapter's full tensor;
* every other tensor: the base's, unchanged.

**Dtypes.** :meth:`AdapterReader.tensors` reports the base's dtype for every tensor (the dtype a
full fine-tune of that base would be stored in, so output dtypes and plan checks behave as for a
dense model). ``read`` of a LoRA'd tensor returns **float32** (float64 for a float64 base): W0 is
widened exactly and the update added there, so a bf16/fp16 base does not round a small update away
before the engine casts to the compute dtype (float32 by default). PEFT's ``merge_and_unload`` on a
bf16 model adds the update in bf16; mergelab rounds once, at the output dtype.

Everything about the adapter is checked when the reader is built, from the safetensors header and
``adapter_config.json`` only: the adapter type and variant, that every LoRA module exists in the
base, A/B shapes against each other, the base weight and the configured rank, float factors, and
the base the adapter was trained on (:func:`check_base_match`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mergelab.checkpoint.reader import (
    CheckpointReader,
    ReaderSpec,
    SafetensorsReader,
    TensorMeta,
    TorchBinReader,
    resolve_hub,
)
from mergelab.errors import CheckpointError
from mergelab.lora.config import CONFIG_NAME, AdapterConfig, load_adapter_config
from mergelab.lora.factors import LoraFactors

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
"""Architectures whose projections are transformers' ``Conv1D`` (weight stored ``in × out``): PEFT
applies their LoRA transposed whatever ``fan_in_fan_out`` says (it corrects the flag per layer)."""

_LINEAR_KEY = re.compile(r"^(?P<mod>.+)\.(?P<ab>lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.(?P<p>weight|bias)$")
_EMBED_KEY = re.compile(r"^(?P<mod>.+)\.(?P<ab>lora_embedding_A|lora_embedding_B)(?:\.[A-Za-z0-9_-]+)?$")
_MAG_KEY = re.compile(r"^(?P<mod>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")
_BASE_LAYER_KEY = re.compile(r"^(?P<mod>.+)\.base_layer\.(?P<p>[^.]+)$")
_SAVED_KEY = re.compile(r"^(?P<mod>.+)\.modules_to_save\.[A-Za-z0-9_-]+\.(?P<p>.+)$")


def is_adapter_folder(folder: Path) -> bool:
    """A PEFT adapter folder: ``adapter_config.json`` and adapter weights, no full-model weights beside them."""
    if not (folder / CONFIG_NAME).is_file():
        return False
    if not any((folder / n).is_file() for n in ADAPTER_WEIGHTS):
        return False
    full = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if any((folder / n).is_file() for n in full):
        return False
    return all(f.name.startswith("adapter_model") for f in folder.glob("*.safetensors"))


def split_base_plus_adapter(ref: str) -> tuple[str, str] | None:
    """mergekit's ``base+adapter`` model string as (base, adapter), or None when ``ref`` is not one.

    A reference that exists on disk as written is never split; otherwise it is split at its last
    ``+`` (Hub ids and most paths have none).
    """
    if "+" not in ref or Path(ref).expanduser().exists():
        return None
    base, _, adapter = ref.rpartition("+")
    if not base or not adapter:
        return None
    return base, adapter


def adapter_weights_file(folder: Path) -> Path:
    """``adapter_model.safetensors`` (preferred) or ``adapter_model.bin`` of ``folder``."""
    for n in ADAPTER_WEIGHTS:
        if (folder / n).is_file():
            return folder / n
    raise CheckpointError(
        f"{folder}: no adapter weights (adapter_model.safetensors or adapter_model.bin) beside adapter_config.json; "
        "re-save the adapter with peft"
    )


# --- the base an adapter was trained on ------------------------------------------------------


def _norm(s: str) -> str:
    return s.strip().rstrip("/").lower()


def _hub_id_of(path: Path) -> str | None:
    """``owner/name`` of a folder inside the Hub cache (``models--owner--name/snapshots/<rev>``)."""
    for part in path.parts:
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return None


def base_names(base: CheckpointReader) -> set[str]:
    """Every name ``base`` is known by: its label, resolved folder, Hub id and config ``_name_or_path``."""
    names = {base.label}
    if base.folder is not None:
        names.add(str(base.folder))
        with contextlib.suppress(OSError):
            names.add(str(Path(base.folder).resolve()))
        hub = _hub_id_of(Path(base.folder).resolve())
        if hub:
            names.add(hub)
    cfg = base.config() or {}
    for key in ("_name_or_path", "name_or_path"):
        if isinstance(cfg.get(key), str) and cfg[key]:
            names.add(cfg[key])
    return {_norm(n) for n in names if n}


def base_matches(claimed: str, base: CheckpointReader) -> bool:
    """Whether the adapter's ``base_model_name_or_path`` names ``base``: the same string, the same
    resolved folder, or the same last path component (a Hub id's name and a local copy's folder)."""
    names = base_names(base)
    c = _norm(claimed)
    if c in names:
        return True
    cp = Path(claimed).expanduser()
    if cp.exists():
        try:
            if base.folder is not None and cp.resolve() == Path(base.folder).resolve():
                return True
        except OSError:
            pass
    last = c.rsplit("/", 1)[-1]
    return bool(last) and any(n.rsplit("/", 1)[-1] == last for n in names)


def check_base_match(cfg: AdapterConfig, adapter_label: str, base: CheckpointReader) -> None:
    """Refuse (one line) an adapter whose ``base_model_name_or_path`` does not name ``base``.

    An adapter that records no base is accepted (its shapes are still checked against ``base``).
    Override: recipe key ``allow_adapter_base_mismatch: true`` or ``--allow-adapter-base-mismatch``.
    """
    claimed = cfg.base_model_name_or_path
    if not claimed or base_matches(claimed, base):
        return
    raise CheckpointError(
        f"{adapter_label}: this adapter was trained on {claimed!r} but the base it would be applied to is "
        f"{base.label!r}; give its own base, or set allow_adapter_base_mismatch: true in the recipe "
        "(--allow-adapter-base-mismatch) if the two are the same model"
    )


# --- modules ------------------------------------------------------------------------------


@dataclass
class _LoraModule:
    module: str  # PEFT's module name (the base model's module path)
    target: str  # the base tensor it updates (``<module>.weight``, possibly prefixed differently)
    embedding: bool
    a_key: str | None = None
    b_key: str | None = None
    bias_key: str | None = None  # lora_B.bias (lora_bias=True)
    bias_target: str | None = None
    magnitude_key: str | None = None  # DoRA
    rank: int = 0
    scaling: float = 1.0
    transposed: bool = False
    keys: list[str] = field(default_factory=list)
    kind_known: bool = True  # False while only a DoRA magnitude has been seen


@dataclass(frozen=True)
class AdapterSpec:
    """How to reopen an :class:`AdapterReader`: the base's spec, the adapter folder, the check flag."""

    label: str
    base: ReaderSpec
    folder: str
    allow_base_mismatch: bool = False
    hub_id: str | None = None
    revision: str | None = None

    def open(self) -> CheckpointReader:
        folder = Path(self.folder) if self.hub_id is None else resolve_hub(self.hub_id, self.revision)
        return AdapterReader(
            self.base.open(),
            folder,
            label=self.label,
            allow_base_mismatch=self.allow_base_mismatch,
            owns_base=True,
            spec=self,
        )


class AdapterReader:
    """A PEFT LoRA adapter over its base, read as the dense model ``merge_and_unload`` would give.

    ``tensors()`` are the base's names and shapes (dtype: the base's; see the module docstring);
    ``read(name)`` materialises one tensor; ``factors(name)`` gives the raw LoRA factors of a LoRA'd
    tensor. ``folder`` and ``config()`` are the base's (side files, layer count); the adapter's own
    folder is ``adapter_folder``.
    """

    def __init__(
        self,
        base: CheckpointReader,
        folder: str | Path,
        *,
        label: str | None = None,
        allow_base_mismatch: bool = False,
        owns_base: bool = False,
        spec: AdapterSpec | None = None,
    ):
        self.adapter_folder = Path(folder)
        self.label = label or str(folder)
        self.base = base
        self.folder = base.folder
        self._owns_base = owns_base
        self._spec = spec
        self._allow = allow_base_mismatch
        self.adapter_config: AdapterConfig = load_adapter_config(self.adapter_folder)
        self.weights_path = adapter_weights_file(self.adapter_folder)
        self._files = [self.adapter_folder, self.weights_path, self.adapter_folder / CONFIG_NAME]
        why = self.adapter_config.unsupported()
        if why:
            raise CheckpointError(f"{self.label}: {why}")
        if not allow_base_mismatch:
            check_base_match(self.adapter_config, self.label, base)
        self._weights: SafetensorsReader | TorchBinReader
        if self.weights_path.suffix == ".safetensors":
            self._weights = SafetensorsReader(self.label, self.adapter_folder, [self.weights_path])
        else:
            self._weights = TorchBinReader(self.label, self.adapter_folder, [self.weights_path])
        self._lora: dict[str, _LoraModule] = {}  # base tensor name -> module
        self._bias: dict[str, _LoraModule] = {}  # base bias name -> module (lora_bias)
        self._replace: dict[str, str] = {}  # base tensor name -> adapter key (full tensors)
        self._tied_copy: dict[str, str] = {}  # base embedding name -> adapter key of its tied head's copy
        self._plan()

    # --- validation (headers only) -------------------------------------------------------
    def _where(self, key: str) -> str:
        return f"{self.weights_path}: key {key!r}"

    def _base_name(self, name: str, key: str, what: str) -> str:
        """The base tensor that the adapter's ``name`` (``<module>.<param>``) stands for."""
        names = self.base.tensors()
        if name in names:
            return name
        found = [b for b in names if b.endswith("." + name) or name.endswith("." + b)]
        if len(found) == 1:
            return found[0]
        if found:
            raise CheckpointError(
                f"{self._where(key)}: {what} {name!r} matches several base tensors ({', '.join(sorted(found)[:3])}); "
                "the adapter's module names do not fit this base"
            )
        raise CheckpointError(
            f"{self._where(key)}: {what} {name!r} does not exist in the base {self.base.label}; "
            "the adapter was made for another model (or another version of it)"
        )

    def _plan(self) -> None:
        metas = self._weights.tensors()
        modules: dict[str, _LoraModule] = {}
        full: dict[str, str] = {}  # adapter name (no prefix) -> key

        def module(mod: str, embedding: bool | None, key: str) -> _LoraModule:
            m = modules.get(mod)
            if m is None:
                m = modules[mod] = _LoraModule(mod, "", bool(embedding))
                m.kind_known = embedding is not None
            elif embedding is None:
                pass
            elif not m.kind_known:
                m.embedding, m.kind_known = embedding, True
            elif m.embedding != embedding:
                raise CheckpointError(f"{self._where(key)}: module {mod!r} has both Linear and embedding LoRA keys")
            m.keys.append(key)
            return m

        for key, meta in metas.items():
            name = key.removeprefix(PEFT_PREFIX)
            if meta.dtype.is_floating_point is False:
                raise CheckpointError(
                    f"{self._where(key)}: dtype {str(meta.dtype).removeprefix('torch.')} is not a float dtype "
                    "(quantised adapters are not supported); re-save the adapter in float32 or bfloat16"
                )
            if meta.dtype == torch.float8_e4m3fn or meta.dtype == torch.float8_e5m2:
                raise CheckpointError(f"{self._where(key)}: float8 adapter tensors are not supported")
            if mm := _LINEAR_KEY.match(name):
                m = module(mm["mod"], False, key)
                if mm["p"] == "bias":
                    if mm["ab"] == "lora_A":
                        raise CheckpointError(f"{self._where(key)}: lora_A has no bias in PEFT's LoRA")
                    m.bias_key = key
                elif mm["ab"] == "lora_A":
                    m.a_key = key
                else:
                    m.b_key = key
            elif mm := _EMBED_KEY.match(name):
                m = module(mm["mod"], True, key)
                if mm["ab"] == "lora_embedding_A":
                    m.a_key = key
                else:
                    m.b_key = key
            elif mm := _MAG_KEY.match(name):
                module(mm["mod"], None, key).magnitude_key = key
            elif (mm := _BASE_LAYER_KEY.match(name)) or (mm := _SAVED_KEY.match(name)):
                full[f"{mm['mod']}.{mm['p']}"] = key
            elif ".lora_" in name or name.startswith("lora_"):
                raise CheckpointError(
                    f"{self._where(key)}: unknown LoRA tensor kind; only lora_A/lora_B, lora_embedding_A/B, "
                    "lora_magnitude_vector (DoRA) and lora_B.bias are supported"
                )
            else:
                full[name] = key
        if not modules and not full:
            raise CheckpointError(f"{self.weights_path}: the adapter holds no tensors")
        base_metas = self.base.tensors()
        heads = self._tied_head_copies(full, base_metas)
        for name, key in full.items():
            if name in heads:
                continue
            target = self._base_name(name, key, "tensor")
            want, have = base_metas[target].shape, metas[key].shape
            if want != have:
                raise CheckpointError(
                    f"{self._where(key)}: full tensor is {list(have)} but the base's {target!r} is {list(want)}; "
                    "resized vocabularies are not supported: resize the base the same way first"
                )
            self._replace[target] = key
        model_type = (self.base.config() or {}).get("model_type")
        for name in self._tied_head_lora(modules, base_metas):
            del modules[name]
        for m in modules.values():
            self._check_module(m, metas, base_metas, model_type)
            self._lora[m.target] = m
            if m.bias_target is not None:
                self._bias[m.bias_target] = m

    def _tied_head_lora(self, modules: Mapping[str, _LoraModule], base_metas: Mapping[str, TensorMeta]) -> list[str]:
        """LoRA modules of a tied output head that PEFT's ``ensure_weight_tying`` derives from the input
        embedding's LoRA (its saved copies are the embedding's factors transposed): skipped, since the
        base stores no head and the adapted embedding is the head."""
        from mergelab.checkpoint.reader import tie_word_embeddings

        if not (self.adapter_config.model_extra or {}).get("ensure_weight_tying"):
            return []
        if tie_word_embeddings(self.base.config()) is not True:
            return []
        has_embedding_lora = any(m.embedding for m in modules.values())
        return [
            name
            for name, m in modules.items()
            if has_embedding_lora
            and not m.embedding
            and f"{name}.weight" not in base_metas
            and name.endswith("lm_head")
        ]

    def _tied_head_copies(self, full: Mapping[str, str], base_metas: Mapping[str, TensorMeta]) -> dict[str, str]:
        """Full tensors that are a tied output head's copy of the input embedding: adapter name -> key.

        PEFT saves ``lm_head`` beside ``embed_tokens`` in ``modules_to_save`` when the base ties them
        (mergelab's own ``extract-lora --keep-non-lora`` does too); the base stores no ``lm_head``. Such a
        copy is accepted when the adapter also stores the embedding itself, and :meth:`read_base`
        checks that both are equal (else the adapted model is untied, which this base cannot hold).
        """
        from mergelab.checkpoint.reader import tie_word_embeddings

        if tie_word_embeddings(self.base.config()) is not True:
            return {}
        out: dict[str, str] = {}
        embeds = {
            n: k
            for n, k in full.items()
            if n.endswith(".weight") and n.rsplit(".", 2)[-2] in ("embed_tokens", "wte", "word_embeddings", "embed_in")
        }
        for name, key in full.items():
            if name in base_metas or not name.endswith("lm_head.weight") or len(embeds) != 1:
                continue
            ((emb_name, emb_key),) = embeds.items()
            target = self._base_name(emb_name, emb_key, "tensor")
            if tuple(base_metas[target].shape) == tuple(self._weights.tensors()[key].shape):
                out[name] = key
                self._tied_copy[target] = key
        return out

    def _check_module(
        self,
        m: _LoraModule,
        metas: Mapping[str, TensorMeta],
        base_metas: Mapping[str, TensorMeta],
        model_type: object,
    ) -> None:
        cfg = self.adapter_config
        first = m.keys[0]
        if m.a_key is None or m.b_key is None:
            missing = (
                ("lora_embedding_A" if m.embedding else "lora_A")
                if m.a_key is None
                else ("lora_embedding_B" if m.embedding else "lora_B")
            )
            raise CheckpointError(
                f"{self._where(first)}: module {m.module!r} has no {missing}; the adapter is incomplete"
            )
        a, b = metas[m.a_key].shape, metas[m.b_key].shape
        if len(a) != 2 or len(b) != 2:
            raise CheckpointError(
                f"{self._where(m.a_key)}: LoRA factors of {m.module!r} are {list(a)} and {list(b)}: only 2-D "
                "(Linear, Conv1D, embedding) LoRA is supported, not convolution LoRA"
            )
        r = a[0]
        if b[1] != r:
            raise CheckpointError(
                f"{self._where(m.b_key)}: B is {list(b)} but A is {list(a)}: B's columns must equal A's rows (the rank)"
            )
        want_r = cfg.rank_for(m.module)
        if r != want_r:
            raise CheckpointError(
                f"{self._where(m.a_key)}: rank {r} but adapter_config.json gives {m.module!r} rank {want_r} "
                "(r / rank_pattern); the config does not belong to these weights"
            )
        m.rank = r
        m.scaling = cfg.scaling_for(m.module)
        m.target = self._base_name(f"{m.module}.weight", m.a_key, "module")
        w = base_metas[m.target].shape
        out_in = (b[0], a[1])
        if m.embedding:
            m.transposed = True  # PEFT: ΔW = (B @ A)ᵀ, num_embeddings × dim
        elif len(w) == 2 and w[0] == w[1] == out_in[0] == out_in[1]:
            # a square weight: the layer type decides, as in PEFT (Conv1D transposed, Linear not)
            if model_type in CONV1D_MODEL_TYPES:
                m.transposed = not m.target.endswith("lm_head.weight")
            elif isinstance(model_type, str):
                m.transposed = False
            else:  # no config.json: trust the adapter's flag
                m.transposed = cfg.fan_in_fan_out
        elif tuple(w) == out_in:
            m.transposed = False
        elif tuple(w) == out_in[::-1]:
            m.transposed = True
        stored = out_in[::-1] if m.transposed else out_in
        if tuple(w) != stored:
            raise CheckpointError(
                f"{self._where(m.a_key)}: A {list(a)} and B {list(b)} give a {list(stored)} update, but the base's "
                f"{m.target!r} is {list(w)}; the adapter does not fit this base"
            )
        if m.magnitude_key is not None:
            if m.embedding:
                raise CheckpointError(
                    f"{self._where(m.magnitude_key)}: DoRA on an embedding is not supported; "
                    "merge it with peft (merge_and_unload) and give that model"
                )
            mag = metas[m.magnitude_key].shape
            if tuple(mag) != (out_in[0],):
                raise CheckpointError(
                    f"{self._where(m.magnitude_key)}: DoRA magnitude is {list(mag)}, expected [{out_in[0]}] (the "
                    "module's output size)"
                )
        elif cfg.use_dora:
            raise CheckpointError(
                f"{self._where(m.a_key)}: use_dora is set but module {m.module!r} has no lora_magnitude_vector"
            )
        if m.bias_key is not None:
            bias_shape = metas[m.bias_key].shape
            m.bias_target = m.target.removesuffix("weight") + "bias"
            if m.bias_target not in base_metas:
                raise CheckpointError(
                    f"{self._where(m.bias_key)}: lora_bias on {m.module!r}, but the base has no {m.bias_target!r}; "
                    "PEFT cannot merge it either"
                )
            if tuple(bias_shape) != (out_in[0],) or base_metas[m.bias_target].shape != bias_shape:
                raise CheckpointError(
                    f"{self._where(m.bias_key)}: lora_B.bias is {list(bias_shape)}, expected [{out_in[0]}]"
                )

    # --- CheckpointReader -----------------------------------------------------------------
    def tensors(self) -> Mapping[str, TensorMeta]:
        """The base's tensors (names, shapes, the base's dtypes)."""
        return self.base.tensors()

    def config(self) -> dict | None:
        """The base's config.json."""
        return self.base.config()

    def _work_dtype(self, t: torch.Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def read_base(self, name: str) -> torch.Tensor:
        """``W0`` of ``name``: the adapter's own full copy when it stores one (modules_to_save,
        ``base_layer``), else the base's tensor."""
        key = self._replace.get(name)
        if key is None:
            return self.base.read(name)
        t = self._weights.read(key)
        head = self._tied_copy.get(name)
        if head is not None and not torch.equal(t, self._weights.read(head)):
            raise CheckpointError(
                f"{self._where(head)}: the adapter's output head differs from its input embedding {name!r}, but the "
                "base ties them (PEFT's merge_and_unload would untie them, which a checkpoint of this base cannot "
                "hold); save the adapter with equal copies, or without lm_head in modules_to_save"
            )
        return t

    def read(self, name: str) -> torch.Tensor:
        """``name`` as ``merge_and_unload`` gives it (float32 for a LoRA'd tensor; see the module docstring)."""
        m = self._lora.get(name)
        if m is not None:
            w0 = self.read_base(name)
            wd = self._work_dtype(w0)
            w = w0.to(wd) + self._factors(m).stored_delta(wd)
            if m.magnitude_key is not None:
                mag = self._weights.read(m.magnitude_key).to(wd)
                norm = torch.linalg.vector_norm(w, dim=0 if m.transposed else 1)
                factor = mag / norm
                w = w * (factor.view(1, -1) if m.transposed else factor.view(-1, 1))
            return w
        mb = self._bias.get(name)
        if mb is not None:
            b0 = self.read_base(name)
            wd = self._work_dtype(b0)
            assert mb.bias_key is not None
            return b0.to(wd) + self._weights.read(mb.bias_key).to(wd) * mb.scaling
        return self.read_base(name)

    def spec(self) -> ReaderSpec:
        """Reopens the base from its own spec and the adapter from its folder."""
        if self._spec is not None:
            return self._spec
        return AdapterSpec(self.label, self.base.spec(), str(self.adapter_folder), self._allow)

    def close(self) -> None:
        self._weights.close()
        if self._owns_base:
            self.base.close()

    def weight_paths(self) -> list[Path]:
        """The files this reader's tensors come from: the base's weight files and the adapter's."""
        from mergelab.checkpoint.reader import weight_files

        return sorted({*weight_files(self.base), self.weights_path, self.adapter_folder / CONFIG_NAME})

    def changed(self) -> list[str]:
        """Every base tensor name whose value the adapter changes (LoRA'd, stored whole, bias-updated)."""
        return sorted({*self._lora, *self._replace, *self._bias})

    def apply_to_module(self, module: torch.nn.Module) -> None:
        """Write the adapter's materialised tensors into ``module``, a model loaded from the base, in
        place (the data phase of data-informed methods runs the adapted model this way). Module
        parameter names may differ from the checkpoint's by a prefix (``transformer.``)."""
        state = module.state_dict(keep_vars=True)
        with torch.no_grad():
            for name in self.changed():
                target = name if name in state else None
                if target is None:
                    found = [k for k in state if k.endswith("." + name) or name.endswith("." + k)]
                    if len(found) != 1:
                        raise CheckpointError(
                            f"{self.label}: tensor {name!r} has no single counterpart in the loaded model "
                            f"({type(module).__name__}); load the adapter with peft and pass that module"
                        )
                    target = found[0]
                p = state[target]
                p.copy_(self.read(name).to(device=p.device, dtype=p.dtype))

    # --- the adapter as factors -------------------------------------------------------------
    def _factors(self, m: _LoraModule) -> LoraFactors:
        assert m.a_key is not None and m.b_key is not None
        return LoraFactors(self._weights.read(m.a_key), self._weights.read(m.b_key), m.scaling, m.transposed)

    def lora_targets(self) -> dict[str, str]:
        """Base tensor name -> PEFT module name, for every tensor the adapter updates with LoRA factors."""
        return {t: m.module for t, m in self._lora.items()}

    def replaced(self) -> set[str]:
        """Base tensor names the adapter stores whole (``modules_to_save``, trained biases, ``base_layer``)."""
        return set(self._replace)

    def is_dora(self, name: str) -> bool:
        """Whether ``name`` is updated by DoRA (not a low-rank update: :meth:`factors` refuses it)."""
        m = self._lora.get(name)
        return m is not None and m.magnitude_key is not None

    def factors(self, name: str) -> LoraFactors | None:
        """The raw LoRA factors of tensor ``name`` (scaling resolved; ``stored_delta()`` is the update
        of the stored tensor), or None when the adapter does not LoRA it (see :meth:`replaced` for
        tensors it stores whole). DoRA modules raise :class:`CheckpointError`: their update is not
        ``s·B·A``. ``lora_bias`` updates are not part of the factors (see :meth:`bias_update`)."""
        m = self._lora.get(name)
        if m is None:
            return None
        if m.magnitude_key is not None:
            raise CheckpointError(
                f"{self._where(m.magnitude_key)}: DoRA module {m.module!r} is not a low-rank update; "
                "merge its materialised weights instead (a dense output)"
            )
        return self._factors(m)

    def bias_update(self, name: str) -> torch.Tensor | None:
        """``scaling · lora_B.bias`` for bias tensor ``name`` of a ``lora_bias`` module, else None."""
        m = self._bias.get(name)
        if m is None or m.bias_key is None:
            return None
        b = self._weights.read(m.bias_key)
        return b.to(torch.float64 if b.dtype == torch.float64 else torch.float32) * m.scaling


def open_adapter(
    label: str,
    folder: Path,
    base: CheckpointReader,
    *,
    allow_base_mismatch: bool = False,
    owns_base: bool = False,
    hub_id: str | None = None,
) -> AdapterReader:
    """An :class:`AdapterReader` of the adapter in ``folder`` over ``base`` (checked at once, headers only)."""
    spec = None
    if hub_id is not None:
        spec = AdapterSpec(label, base.spec(), str(folder), allow_base_mismatch, hub_id=hub_id)
    try:
        return AdapterReader(
            base, folder, label=label, allow_base_mismatch=allow_base_mismatch, owns_base=owns_base, spec=spec
        )
    except BaseException:
        if owns_base:
            base.close()
        raise
