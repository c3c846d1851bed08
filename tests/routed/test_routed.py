"""The routed output format: mask packing, the manifest and storage report, and `extract`
rebuilding each task's model (against independent formulas, and exactly when masks keep
everything a task moved)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from routed_helpers import recipe
from safetensors.torch import save_file
from tiny_models import load_dir
from typer.testing import CliRunner

import mergelab
from mergelab.errors import CheckpointError, MergelabError, OutputError
from mergelab.routed import (
    extract,
    is_routed,
    pack_mask,
    read_manifest,
    task_state_dict,
    unpack_mask,
)
from mergelab.routed.format import FORMAT_VERSION, format_storage, task_names


@pytest.fixture(scope="module")
def merged(family, tmp_path_factory):
    base, experts = family
    root = tmp_path_factory.mktemp("routed")
    outs = {}
    for method in ("tall_masks", "emr"):
        outs[method] = root / method
        mergelab.merge(recipe(method, base, experts), outs[method], max_shard_size="150KB", hash_inputs=False)
    return base, experts, outs


# ------------------------------------------------------------------------------- packing


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 64, 1001])
def test_pack_unpack_round_trip_and_bit_order(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.4
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert packed.numpy().tolist() == np.packbits(mask.numpy(), bitorder="little").tolist()
    assert torch.equal(unpack_mask(packed, (n,)), mask)


def test_pack_little_endian_layout_and_shapes():
    mask = torch.tensor([[True, False, False, False], [False, False, False, False], [False, True, False, False]])
    packed = pack_mask(mask)  # elements 0 and 9 -> byte 0 bit 0, byte 1 bit 1
    assert packed.tolist() == [1, 2]
    assert torch.equal(unpack_mask(packed, mask.shape), mask)
    with pytest.raises(CheckpointError):
        unpack_mask(packed, (40,))


def test_task_names_are_short_and_unique():
    assert task_names(["/a/b/expert_0", "/c/expert_1/", "x/y z"]) == ["expert_0", "expert_1", "y_z"]
    assert task_names(["/a/m", "/b/m", "<expert 2>"]) == ["m-0", "m-1", "expert_2"]


# ------------------------------------------------------------------------------- manifest


def test_manifest_and_storage_report(merged):
    base, experts, outs = merged
    out = outs["tall_masks"]
    assert is_routed(out) and not is_routed(base)
    man = read_manifest(out)
    assert man["format_version"] == FORMAT_VERSION and man["method"] == "tall_masks"
    assert [t["name"] for t in man["tasks"]] == ["expert_0", "expert_1", "expert_2"]
    assert [t["model"] for t in man["tasks"]] == [str(e) for e in experts]
    assert all(t["scale"] == 1.0 and t["parameters"]["tall_lambda"] == 0.6 for t in man["tasks"])
    shared = load_dir(out)
    assert set(man["routed_tensors"]) == {k for k, v in shared.items() if v.is_floating_point()}
    n_params = sum(shared[k].numel() for k in man["routed_tensors"])
    assert man["parameters_routed"] == n_params
    s = man["storage"]
    assert s["total_bytes"] == s["shared_bytes"] + s["base_bytes"] + s["masks_bytes"]
    assert s["separate_experts_bytes"] == 3 * s["shared_bytes"]
    # masks: 1 bit per parameter per task, plus headers
    assert 3 * n_params / 8 <= s["masks_bytes"] <= 3 * n_params / 8 + 64 * 1024
    assert s["ratio"] == pytest.approx(s["total_bytes"] / s["separate_experts_bytes"])
    assert 0.6 < s["ratio"] < 0.75  # 2 models + 3 bit masks vs 3 models
    assert s["input_experts_bytes"] > 0
    assert format_storage(s) == s["summary"] and "separate experts" in s["summary"]
    # the shared checkpoint is a normal HF folder: the routed folder does not leak into it
    assert not any(k.startswith("routed") for k in shared)
    # densities recorded per task match the masks
    for t in man["tasks"]:
        assert 0 <= t["mask_density"] <= 1 and t["mask_ones"] == round(t["mask_density"] * n_params)


def test_manifest_version_and_missing(merged, tmp_path):
    _, _, outs = merged
    with pytest.raises(CheckpointError, match="not a routed"):
        read_manifest(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(outs["emr"], copy)
    path = copy / "routed" / "manifest.json"
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="version 99"):
        read_manifest(copy)


# ------------------------------------------------------------------------------- extract


def _independent_tall(b, es, lam=0.6):
    taus = {k: [e[k].float() - b[k].float() for e in es] for k in b if b[k].is_floating_point()}
    models = []
    for t in range(len(es)):
        sd = {}
        for k, ts in taus.items():
            mtl = torch.zeros_like(ts[0])
            for x in ts:
                mtl = mtl + x
            shared = mtl + b[k].float()
            mask = ts[t].abs() > lam * (mtl - ts[t]).abs()
            sd[k] = torch.where(mask, shared, b[k].float())
        models.append(sd)
    return models


def _independent_emr(b, es):
    keys = [k for k in b if b[k].is_floating_point()]
    taus = {k: [e[k].float() - b[k].float() for e in es] for k in keys}
    uni, masks = {}, {}
    num, den = torch.zeros(len(es), dtype=torch.float64), torch.zeros(len(es), dtype=torch.float64)
    for k in keys:
        stack = torch.stack(taus[k])
        gamma = torch.where(stack.sum(0) > 0, 1.0, -1.0)
        agree = stack * gamma > 0
        uni[k] = gamma * (stack.abs() * agree).amax(0)
        masks[k] = agree
        num += stack.abs().double().mean(dim=tuple(range(1, stack.dim())))
        den += (uni[k] * agree).abs().double().mean(dim=tuple(range(1, stack.dim())))
    scales = (num / den).tolist()
    return [{k: b[k].float() + scales[t] * uni[k] * masks[k][t] for k in keys} for t in range(len(es))], scales


@pytest.mark.parametrize("method", ["tall_masks", "emr"])
def test_extract_matches_independent_formula(merged, tmp_path, method):
    base, experts, outs = merged
    b = load_dir(base)
    es = [load_dir(e) for e in experts]
    if method == "tall_masks":
        want = _independent_tall(b, es)
    else:
        want, scales = _independent_emr(b, es)
        assert [t["scale"] for t in read_manifest(outs[method])["tasks"]] == pytest.approx(scales, rel=1e-6)
    for t in range(len(experts)):
        res = extract(outs[method], t, tmp_path / f"{method}-{t}", max_shard_size="100KB")
        got = load_dir(res.path)
        assert set(got) == set(b)
        for k, v in want[t].items():
            assert got[k].dtype == b[k].dtype
            assert torch.allclose(got[k].float(), v, atol=1e-6, rtol=0), (t, k)
        assert (res.path / "config.json").is_file() and (res.path / "tokenizer.json").is_file()
        assert (res.path / "model.safetensors.index.json").is_file()  # sharded as asked


def _disjoint_family(family, root: Path, n: int = 3) -> tuple[Path, list[Path], list[dict]]:
    """Experts whose task vectors have disjoint supports: every weight is moved by one task at most."""
    base, _ = family
    b = load_dir(base)
    g = torch.Generator().manual_seed(9)
    owner = {k: torch.randint(0, n + 1, v.shape, generator=g) for k, v in b.items()}  # n = nobody
    experts, sds = [], []
    for t in range(n):
        sd = {
            k: torch.where(owner[k] == t, v + 0.05 * torch.randn(v.shape, generator=g), v).contiguous()
            for k, v in b.items()
        }
        folder = root / f"disjoint_{t}"
        folder.mkdir()
        for side in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            if (base / side).is_file():
                shutil.copyfile(base / side, folder / side)
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
        experts.append(folder)
        sds.append(sd)
    return base, experts, sds


@pytest.mark.parametrize("method", ["tall_masks", "emr"])
def test_extract_rebuilds_each_expert_when_masks_keep_everything(family, tmp_path, method):
    base, experts, sds = _disjoint_family(family, tmp_path)
    out = tmp_path / "out"
    mergelab.merge(recipe(method, base, experts), out, hash_inputs=False)
    man = read_manifest(out)
    assert all(t["scale"] == pytest.approx(1.0) for t in man["tasks"])
    for t, sd in enumerate(sds):
        got = task_state_dict(out, man["tasks"][t]["name"])
        for k, v in sd.items():
            assert torch.allclose(got[k], v, atol=1e-6, rtol=0), (t, k)


def test_one_expert_round_trip(family, tmp_path):
    base, experts = family
    out = tmp_path / "one"
    mergelab.merge(recipe("emr", base, experts[:1]), out, hash_inputs=False)
    got = task_state_dict(out, 0)
    for k, v in load_dir(experts[0]).items():
        assert torch.allclose(got[k], v, atol=1e-6, rtol=0), k


def test_extract_errors_and_force(merged, tmp_path):
    _, _, outs = merged
    dest = tmp_path / "x"
    extract(outs["tall_masks"], "expert_1", dest)
    with pytest.raises(OutputError, match="exists"):
        extract(outs["tall_masks"], "expert_1", dest)
    res = extract(outs["tall_masks"], "2", dest, force=True)
    assert res.task["name"] == "expert_2" and "expert_2" in (dest / "README.md").read_text()
    with pytest.raises(MergelabError, match="0=expert_0, 1=expert_1, 2=expert_2"):
        extract(outs["tall_masks"], "nope", tmp_path / "y")
    with pytest.raises(MergelabError, match="unknown task"):
        extract(outs["tall_masks"], 7, tmp_path / "y")
    assert not (tmp_path / "y").exists()
    with pytest.raises(CheckpointError, match="not a routed"):
        extract(dest, 0, tmp_path / "z")
    assert not list(tmp_path.glob(".*mergelab-tmp*"))  # failed runs leave nothing behind


def test_extracted_model_loads_in_transformers(merged, tmp_path):
    from transformers import AutoModelForCausalLM

    _, experts, outs = merged
    res = extract(outs["emr"], str(experts[0]), tmp_path / "emr0")
    model = AutoModelForCausalLM.from_pretrained(res.path)
    sd = load_dir(res.path)
    assert torch.equal(model.state_dict()["model.norm.weight"], sd["model.norm.weight"])


def test_tied_embeddings_and_bf16_output(tied_family, tmp_path):
    base, experts = tied_family
    out = tmp_path / "tied"
    mergelab.merge(recipe("tall_masks", base, experts), out, out_dtype="bfloat16", hash_inputs=False)
    shared = load_dir(out)
    assert "lm_head.weight" not in shared  # written once, tied in the config
    man = read_manifest(out)
    assert "lm_head.weight" not in man["routed_tensors"]
    b = load_dir(base)
    got = task_state_dict(out, 0)
    assert set(got) == set(shared)
    mask_base = load_dir(out / "routed" / "base")
    for k, v in got.items():
        assert v.dtype == torch.bfloat16
        # every entry is either the shared value or the base's (a selection, no new rounding)
        assert bool(((v == shared[k]) | (v == mask_base[k])).all()), k
        assert torch.equal(mask_base[k], b[k].to(torch.bfloat16)), k


def test_cli_commands(merged, tmp_path):
    import typer

    from mergelab.routed.commands import extract_command, routed_command

    _, _, outs = merged
    app = typer.Typer()
    app.command("extract")(extract_command)
    app.command("routed")(routed_command)
    runner = CliRunner()
    res = runner.invoke(app, ["extract", str(outs["emr"]), "expert_0", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert "extracted" in res.output and "separate experts" in res.output
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    res = runner.invoke(app, ["extract", str(outs["emr"]), "expert_0", str(tmp_path / "cli")])
    assert res.exit_code != 0 and isinstance(res.exception, OutputError)
    res = runner.invoke(app, ["extract", str(outs["emr"]), "expert_0", str(tmp_path / "cli"), "--force"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["routed", str(outs["emr"])])
    assert res.exit_code == 0 and "expert_2" in res.output
