"""`slices:` recipes: layer stacking (frankenmerges), a method per slice, partial layer ranges.

Expectations are built by hand from the inputs read with safetensors (output layer j is the
named source layer), and a float64 NumPy slerp written from its definition; never from the
planner under test. mergekit's own outputs for the same recipes are in tests/test_mergekit_parity.py.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import load_dir, save_tiny

import mergelab
from mergelab.errors import CheckpointError, MergelabError, PlanError, RecipeError
from mergelab.plan import build_plan, layer_split
from mergelab.recipe import load_recipe
from mergelab.synthetic import make_base, make_expert

ray_available = importlib.util.find_spec("ray") is not None


@pytest.fixture(scope="module")
def deep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two 4-layer tiny Llamas (untied): A and a fine-tune B of it."""
    root = tmp_path_factory.mktemp("deep")
    a = make_base(root / "a", hidden=32, intermediate=64, vocab=64, layers=4, seed=5)
    b = make_expert(a, root / "b", seed=9, scale=0.05)
    return a, b


def layer(sd: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """The tensors of block ``i`` by suffix (``.mlp.up_proj.weight`` ...)."""
    p = f"model.layers.{i}."
    return {k[len(p) - 1 :]: v for k, v in sd.items() if k.startswith(p)}


def stacked(parts: list[tuple[dict[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """Expected block tensors: output layer j = block i of state dict sd for (sd, i) = parts[j]."""
    out = {}
    for j, (sd, i) in enumerate(parts):
        out.update({f"model.layers.{j}{s}": t for s, t in layer(sd, i).items()})
    return out


def frankenmerge(a: Path, b: Path) -> dict:
    return {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
        ],
    }


# ---------------------------------------------------------------- layer stacking


def test_frankenmerge_takes_each_layer_from_its_source_and_loads_with_six_layers(deep, tmp_path):
    a, b = deep
    out = tmp_path / "out"
    res = mergelab.merge(frankenmerge(a, b), out, max_shard_size="60KB")
    sa, sb = load_dir(a), load_dir(b)
    want = stacked([(sa, 0), (sa, 1), (sa, 2), (sb, 1), (sb, 2), (sb, 3)])
    # outside the blocks: embeddings from the first slice, final norm and head from the last (mergekit)
    want["model.embed_tokens.weight"] = sa["model.embed_tokens.weight"]
    want["model.norm.weight"] = sb["model.norm.weight"]
    want["lm_head.weight"] = sb["lm_head.weight"]
    got = load_dir(out)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    assert res.plan_summary["num_layers"] == 6
    assert json.loads((a / "config.json").read_text())["num_hidden_layers"] == 4  # inputs untouched

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 2]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()
    torch.testing.assert_close(model.model.layers[3].mlp.up_proj.weight, layer(sb, 1)[".mlp.up_proj.weight"])


def test_the_same_model_stacked_twice_repeats_its_layers(deep, tmp_path):
    a, _ = deep
    rec = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(a), "layer_range": [1, 4]}]},
        ],
    }
    mergelab.merge(rec, tmp_path / "out")
    sa = load_dir(a)
    got = load_dir(tmp_path / "out")
    want = stacked([(sa, 0), (sa, 1), (sa, 2), (sa, 1), (sa, 2), (sa, 3)])
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


@pytest.mark.parametrize("layer_range, depth", [([0, 2], 2), ([1, 3], 2), ([3, 4], 1)])
def test_a_single_partial_slice_gives_only_those_layers_renumbered(deep, tmp_path, layer_range, depth):
    """Issue 13: a single slice with a partial layer_range used to merge the whole model (4 layers)."""
    a, _ = deep
    rec = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(a), "layer_range": layer_range}]}]}
    out = tmp_path / "out"
    mergelab.merge(rec, out)
    sa = load_dir(a)
    want = stacked([(sa, i) for i in range(*layer_range)])
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        want[k] = sa[k]
    got = load_dir(out)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == depth


def test_partial_slice_with_a_method_merges_the_sources_own_layers(deep, tmp_path):
    """ties over one slice whose sources take different layers: output layer 0 merges A's layer 2 (base)
    with B's layer 1; task_arithmetic keeps the arithmetic checkable by hand."""
    a, b = deep
    rec = {
        "merge_method": "task_arithmetic",
        "base_model": str(a),
        "slices": [
            {
                "sources": [
                    {"model": str(a), "layer_range": [2, 3]},
                    {"model": str(b), "layer_range": [1, 2], "parameters": {"weight": 0.5}},
                ]
            }
        ],
    }
    mergelab.merge(rec, tmp_path / "out")
    sa, sb = load_dir(a), load_dir(b)
    got = load_dir(tmp_path / "out")
    for s, wa in layer(sa, 2).items():
        want = wa + 0.5 * (layer(sb, 1)[s] - wa)
        torch.testing.assert_close(got[f"model.layers.0{s}"], want, rtol=0, atol=1e-6)
    torch.testing.assert_close(
        got["model.norm.weight"],
        sa["model.norm.weight"] + 0.5 * (sb["model.norm.weight"] - sa["model.norm.weight"]),
        rtol=0,
        atol=1e-6,
    )
    assert sorted({layer_split(k)[1] for k in got if layer_split(k)}) == [0]


def _slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Spherical interpolation from the definition (Shoemake 1985), float64; linear when nearly parallel."""
    a, b = v0.astype(np.float64).ravel(), v1.astype(np.float64).ravel()
    cos = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    if abs(cos) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        om = np.arccos(np.clip(cos, -1, 1))
        out = (np.sin((1 - t) * om) * a + np.sin(t * om) * b) / np.sin(om)
    return out.reshape(v0.shape)


def test_slerp_per_slice_with_its_own_parameters(deep, tmp_path):
    a, b = deep
    rec = {
        "merge_method": "slerp",
        "base_model": str(a),
        "slices": [
            {
                "sources": [{"model": str(a), "layer_range": [0, 2]}, {"model": str(b), "layer_range": [0, 2]}],
                "parameters": {"t": 0.3},
            },
            {
                "sources": [{"model": str(a), "layer_range": [2, 4]}, {"model": str(b), "layer_range": [2, 4]}],
                "parameters": {"t": [0.2, 0.9]},  # a gradient over the slice's own two layers
            },
        ],
    }
    mergelab.merge(rec, tmp_path / "out")
    sa, sb = load_dir(a), load_dir(b)
    got = load_dir(tmp_path / "out")
    ts = {0: 0.3, 1: 0.3, 2: 0.2, 3: 0.9}
    assert sum(1 for k in got if layer_split(k)) == sum(1 for k in sa if layer_split(k))
    for k, v in got.items():
        split = layer_split(k)
        t = ts[split[1]] if split else (0.3 if "embed" in k else 0.2)  # non-block: first / last slice at depth 0
        np.testing.assert_allclose(v.numpy(), _slerp(t, sa[k].numpy(), sb[k].numpy()), rtol=0, atol=2e-6, err_msg=k)


@pytest.mark.parametrize(
    "executor",
    [
        "streaming",
        "memory",
        pytest.param("ray", marks=pytest.mark.skipif(not ray_available, reason="ray is not installed")),
    ],
)
def test_every_executor_writes_the_renamed_outputs(deep, tmp_path, executor):
    a, b = deep
    mergelab.merge(frankenmerge(a, b), tmp_path / "want", hash_inputs=False)
    kw = {"workers": 2} if executor == "ray" else {}
    mergelab.merge(frankenmerge(a, b), tmp_path / executor, executor=executor, max_shard_size="40KB", **kw)
    want, got = load_dir(tmp_path / "want"), load_dir(tmp_path / executor)
    assert set(got) == set(want) and len(want) == 6 * 9 + 3
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((tmp_path / executor / "config.json").read_text())["num_hidden_layers"] == 6


def test_the_plan_maps_output_layers_to_source_layers_in_the_name_map(deep):
    a, b = deep
    plan = build_plan(load_recipe(frankenmerge(a, b)))
    try:
        g = plan.graph
        job = next(j for j in g.jobs if j.name == "model.layers.4.self_attn.q_proj.weight")
        (ref,) = job.inputs
        assert g.sources[ref.source].label == str(b) and ref.name == "model.layers.2.self_attn.q_proj.weight"
        assert g.names.input_name(ref.source, job.name) == ref.name
        assert g.num_layers == 6 and g.config_updates == {"num_hidden_layers": 6}
    finally:
        plan.close()


def test_a_single_slice_over_whole_models_is_the_models_form(family):
    base, experts = family
    sl = {
        "merge_method": "ties",
        "base_model": str(base),
        "slices": [
            {
                "sources": [{"model": str(base), "layer_range": [0, 2]}]
                + [{"model": str(e), "layer_range": [0, 2], "parameters": {"density": 0.4}} for e in experts[:2]],
                "parameters": {"lambda": 0.8},
            }
        ],
        "parameters": {"lambda": 0.5},  # the slice's value wins (mergekit's precedence)
    }
    plan = build_plan(load_recipe(sl))
    try:
        assert plan.recipe.slices is None and plan.graph.config_updates == {}
        assert {j.params.lambda_ for j in plan.merge_jobs} == {0.8}
    finally:
        plan.close()


# ---------------------------------------------------------------- other layer namings


def test_gpt2_blocks_are_renumbered_and_n_layer_written(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=32)
    GPT2LMHeadModel(cfg).save_pretrained(str(tmp_path / "g"))
    rec = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(tmp_path / "g"), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(tmp_path / "g"), "layer_range": [1, 3]}]},
        ],
    }
    mergelab.merge(rec, tmp_path / "out")
    src, got = load_dir(tmp_path / "g"), load_dir(tmp_path / "out")
    for j, i in enumerate([0, 1, 1, 2]):
        for k, v in src.items():
            if k.startswith(f"transformer.h.{i}."):
                assert torch.equal(got[k.replace(f".h.{i}.", f".h.{j}.", 1)], v), k
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_layer"] == 4
    model = GPT2LMHeadModel.from_pretrained(str(tmp_path / "out"))
    assert len(model.transformer.h) == 4
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_per_layer_types_follow_their_layers(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    save_tiny(
        Qwen2ForCausalLM, Qwen2Config, tmp_path / "q", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    )
    path = tmp_path / "q" / "config.json"
    raw = json.loads(path.read_text())
    raw["layer_types"] = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    path.write_text(json.dumps(raw))
    rec = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(tmp_path / "q"), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(tmp_path / "q"), "layer_range": [1, 4]}]},
        ],
    }
    mergelab.merge(rec, tmp_path / "out")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out["num_hidden_layers"] == 5
    assert out["layer_types"] == [raw["layer_types"][i] for i in (0, 1, 1, 2, 3)]


# ---------------------------------------------------------------- errors: one line, the right class


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    return msg


def _slices(*sources_per_slice: list[tuple[Path | str, list[int]]], method: str = "passthrough", **extra) -> dict:
    return {
        "merge_method": method,
        "slices": [{"sources": [{"model": str(m), "layer_range": r} for m, r in s]} for s in sources_per_slice],
        **extra,
    }


def test_out_of_range_layer_range_is_a_plan_error(deep):
    a, b = deep
    with pytest.raises(PlanError) as exc:
        build_plan(load_recipe(_slices([(a, [0, 2])], [(b, [2, 6])])))
    assert "[2, 6]" in _one_line(exc) and "4 layers" in str(exc.value)


@pytest.mark.parametrize("bad", [[2, 2], [3, 1], [-1, 2]])
def test_empty_or_inverted_layer_range_is_a_recipe_error(deep, bad):
    a, _ = deep
    with pytest.raises(RecipeError) as exc:
        load_recipe(_slices([(a, bad)]))
    assert "layer_range" in _one_line(exc)


def test_sources_of_different_lengths_in_one_slice_are_refused(deep):
    a, b = deep
    with pytest.raises(RecipeError) as exc:
        load_recipe(_slices([(a, [0, 2]), (b, [0, 3])], method="linear"))
    assert "same number of layers" in _one_line(exc)


def test_a_model_twice_in_one_slice_is_refused(deep):
    a, _ = deep
    with pytest.raises(RecipeError) as exc:
        load_recipe(_slices([(a, [0, 2]), (a, [1, 3])], method="linear"))
    assert "twice" in _one_line(exc)


def test_an_unknown_model_is_one_line(deep, tmp_path):
    a, _ = deep
    with pytest.raises(CheckpointError) as exc:
        build_plan(load_recipe(_slices([(a, [0, 2])], [(tmp_path / "missing", [0, 2])])))
    assert "missing" in _one_line(exc)


def test_base_model_outside_a_slices_sources_is_refused(deep):
    a, b = deep
    rec = _slices([(a, [0, 2]), (b, [0, 2])], [(b, [2, 4])], method="slerp", base_model=str(a), parameters={"t": 0.5})
    with pytest.raises(RecipeError) as exc:
        build_plan(load_recipe(rec))
    assert "slices[1]" in _one_line(exc) and "base_model" in str(exc.value)


def test_passthrough_takes_one_model_per_slice(deep):
    a, b = deep
    with pytest.raises(RecipeError) as exc:
        build_plan(load_recipe(_slices([(a, [0, 2]), (b, [0, 2])])))
    assert "exactly 1" in _one_line(exc)


def test_whole_model_folds_are_refused_across_slices(deep):
    a, b = deep
    rec = _slices(
        [(a, [0, 2]), (b, [0, 2])],
        [(a, [2, 4]), (b, [2, 4])],
        method="ties",
        base_model=str(a),
        parameters={"scope": "global", "density": 0.5},
    )
    with pytest.raises(MergelabError) as exc:
        build_plan(load_recipe(rec))
    assert "scope: global" in _one_line(exc)


def test_cli_validate_exit_code_for_an_out_of_range_slice(deep, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from mergelab.cli import app

    a, _ = deep
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(_slices([(a, [1, 9])])))
    res = CliRunner().invoke(app, ["validate", str(p)])
    assert res.exit_code == 4, res.output
    assert "Traceback" not in res.output


def test_analysis_of_a_slices_recipe_reads_its_sources(family):
    from mergelab.analysis.run import analysis_recipe

    base, experts = family
    rec = analysis_recipe(
        _slices([(base, [0, 2]), (experts[0], [0, 2])], method="slerp", base_model=str(base), parameters={"t": 0.5})
    )
    assert rec.base_model == str(base) and [m.model for m in rec.models] == [str(experts[0])]


def test_bert_encoder_layers_are_stacked(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    save_tiny(
        BertForMaskedLM, BertConfig, tmp_path / "b", num_hidden_layers=3, num_attention_heads=4, vocab_size=50,
        max_position_embeddings=32,
    )  # fmt: skip
    src = str(tmp_path / "b")
    mergelab.merge(_slices([(src, [0, 2])], [(src, [1, 3])]), tmp_path / "out")
    sd, got = load_dir(tmp_path / "b"), load_dir(tmp_path / "out")
    for j, i in enumerate([0, 1, 1, 2]):
        for k, v in sd.items():
            if f".layer.{i}." in k:
                assert torch.equal(got[k.replace(f".layer.{i}.", f".layer.{j}.", 1)], v), k
    assert torch.equal(got["bert.embeddings.word_embeddings.weight"], sd["bert.embeddings.word_embeddings.weight"])
    model = BertForMaskedLM.from_pretrained(str(tmp_path / "out"))
    assert len(model.bert.encoder.layer) == 4


def test_tied_embeddings_stay_tied(tied_family, tmp_path):
    base, experts = tied_family
    mergelab.merge(_slices([(base, [0, 2])], [(experts[0], [1, 2])]), tmp_path / "out")
    got = load_dir(tmp_path / "out")
    assert "lm_head.weight" not in got
    assert torch.equal(got["model.embed_tokens.weight"], load_dir(base)["model.embed_tokens.weight"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.num_hidden_layers == 3


def test_a_layer_the_config_counts_but_the_checkpoint_lacks_is_a_plan_error(deep, tmp_path):
    import shutil

    a, _ = deep
    shutil.copytree(a, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 5}))
    with pytest.raises(PlanError) as exc:
        build_plan(load_recipe(_slices([(tmp_path / "a", [3, 5])])))
    assert "layer 4" in _one_line(exc)
