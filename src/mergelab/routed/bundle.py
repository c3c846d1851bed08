"""The routed-model folder: a shared checkpoint, one PEFT adapter per expert, a router, a manifest.

What ``twin_merging``, ``split_merge``, ``smile`` and ``wemoe`` write (``mergelab merge``), and
what :class:`mergelab.routed.RoutedModel` loads::

    OUT/
      manifest.json               method, parameters, experts, routing, router accuracy, storage, serving
      README.md                   model card (how to load, storage, router accuracy)
      mergelab_recipe.yaml        the recipe
      shared/                     a plain Hugging Face checkpoint (AutoModel...from_pretrained)
      experts/<name>/             a PEFT LoRA adapter of shared/: PeftModel.from_pretrained(shared, experts/<name>)
      router/                     router.safetensors + router_config.json (what it reads, classes, mixing)

Each expert adapter holds that expert's exclusive part relative to ``shared/``: LoRA factors of
the low-rank parts (``lora_alpha = r``: scaling exactly 1), dense 1-D parts as PEFT keeps them
(biases with ``bias: all``, normalisation layers as ``modules_to_save``), dense matrices a method
keeps whole as ``modules_to_save``. ``PeftModel.from_pretrained(shared, experts/<name>)`` is the
model of route ``<name>`` (a one-hot route): that expert's reconstruction.

The manifest's ``serving.routes`` lists, per route, the adapter to load, so a multi-LoRA server
can serve top-1 routing without mergelab (see the manifest's ``serving.note`` for what such a
server must support).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergelab.errors import CheckpointError

FORMAT = "mergelab-routed-model"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARED = "shared"
EXPERTS = "experts"
ROUTER = "router"
ROUTER_WEIGHTS = "router.safetensors"
ROUTER_CONFIG = "router_config.json"
ROUTER_DATA = "router_data.json"


def is_bundle(folder: str | Path) -> bool:
    """True when ``folder`` holds a routed-model folder (a manifest of this format at its top)."""
    path = Path(folder).expanduser() / MANIFEST
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_bundle_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a routed-model folder, validated (format, version, experts, folders present)."""
    folder = Path(folder).expanduser()
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a routed-model folder (no {MANIFEST}); it is written by `mergelab merge`")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot parse the manifest ({exc}); the folder is corrupt") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {data.get('format_version')} is not supported by this mergelab "
            f"(reads version {FORMAT_VERSION}); upgrade mergelab"
        )
    experts = data.get("experts")
    if not isinstance(experts, list) or not experts:
        raise CheckpointError(f"{path}: the manifest has no `experts` list; the folder is corrupt")
    if not (folder / SHARED / "config.json").is_file():
        raise CheckpointError(
            f"{folder / SHARED}: missing or has no config.json; the routed-model folder is incomplete"
        )
    for e in experts:
        adapter = folder / e["adapter"]
        if not (adapter / "adapter_config.json").is_file():
            raise CheckpointError(
                f"{adapter}: the adapter of expert {e['name']!r} is missing (no adapter_config.json); "
                "restore the folder or rebuild it with `mergelab merge`"
            )
    return data


def resolve_expert(manifest: dict[str, Any], expert: str | int) -> dict[str, Any]:
    """The manifest entry of ``expert``: its name, its index or the model reference it came from."""
    from mergelab.routed.format import resolve_entry

    return resolve_entry(manifest["experts"], expert, "expert", "this routed model")


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    """Bytes of the files matching ``pattern`` under ``folder`` (recursively)."""
    return sum(f.stat().st_size for f in folder.rglob(pattern) if f.is_file()) if folder.is_dir() else 0


def weights_bytes(folder: Path) -> int:
    """Bytes of the safetensors weights (and index) in ``folder``."""
    return folder_bytes(folder, "*.safetensors") + folder_bytes(folder, "*.safetensors.index.json")


def storage_report(folder: Path, experts: list[str], expert_input_bytes: int | None = None) -> dict[str, Any]:
    """Shared + per-expert adapters + router against N separate experts (each the shared checkpoint's size)."""
    shared = weights_bytes(folder / SHARED)
    per = {name: weights_bytes(folder / EXPERTS / name) for name in experts}
    router = weights_bytes(folder / ROUTER)
    total = shared + sum(per.values()) + router
    separate = len(experts) * shared
    report: dict[str, Any] = {
        "experts": len(experts),
        "shared_bytes": shared,
        "expert_bytes": per,
        "router_bytes": router,
        "total_bytes": total,
        "separate_experts_bytes": separate,
        "ratio": total / separate if separate else 0.0,
        "note": "separate_experts_bytes = experts × the shared checkpoint's size (each extracted expert has "
        "its layout); manifest, configs and tokenizer files are not counted",
    }
    if expert_input_bytes:
        report["input_experts_bytes"] = expert_input_bytes
    report["summary"] = format_bundle_storage(report)
    return report


def format_bundle_storage(storage: dict[str, Any]) -> str:
    from mergelab.checkpoint.writer import fmt_bytes

    per = storage["expert_bytes"]
    mean = sum(per.values()) / max(1, len(per))
    return (
        f"storage: shared {fmt_bytes(storage['shared_bytes'])} + {len(per)} experts "
        f"{fmt_bytes(sum(per.values()))} ({fmt_bytes(mean)} each) + router {fmt_bytes(storage['router_bytes'])} "
        f"= {fmt_bytes(storage['total_bytes'])} vs {storage['experts']} separate experts "
        f"{fmt_bytes(storage['separate_experts_bytes'])} ({100 * storage['ratio']:.1f} %)"
    )
