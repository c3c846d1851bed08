"""Routed-model folders end to end: build (twin_merging, split_merge, smile, wemoe; routed TALL
masks / EMR), load with RoutedModel, with PEFT and with transformers, extract, generate.

Independent references: PEFT itself (``PeftModel.from_pretrained`` and ``merge_and_unload``) for
each expert's reconstruction, a model per row with weights merged in weight space for the mixing,
the input experts' own tensors for exactness at full rank, and the zoo's split files for the rows
a router may read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from routed_helpers import LLAMA_WORDS, build, recipe, router_texts
from safetensors.torch import load_file
from tiny_models import load_dir
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app
from mergelab.errors import CheckpointError, MergelabError, OptionError, ParameterError, RecipeError
from mergelab.routed import RoutedModel, is_bundle, read_bundle_manifest
from mergelab.routed.extract import expert_state_dict

IDS = torch.tensor([[2, 5, 6, 7, 3], [2, 9, 10, 3, 0], [2, 12, 13, 14, 3]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
LM_IDS = torch.tensor([[1, 5, 6, 7, 3], [0, 1, 9, 10, 3]])
LM_MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])


def _peft(folder: Path, expert: str, causal: bool = False, dtype: torch.dtype = torch.float32):
    from peft import PeftModel
    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal else AutoModel
    shared = cls.from_pretrained(str(folder / "shared"), dtype=dtype)
    return PeftModel.from_pretrained(shared, str(folder / "experts" / expert)).eval()


@pytest.fixture(scope="module")
def bert_outputs(bert_family, tmp_path_factory):
    base, experts = bert_family
    root = tmp_path_factory.mktemp("bert_routed")
    params = {
        "twin_merging": {"density": 0.5},
        "split_merge": {"topk": 0.5, "rank_fraction": 0.5},
        "smile": {"k": 4, "gate_k": 2},
        "wemoe": {"steps": 0},
    }
    return {m: build(m, base, experts, root / m, p) for m, p in params.items()}


@pytest.fixture(scope="module")
def llama_outputs(tied_family, tmp_path_factory):
    base, experts = tied_family
    root = tmp_path_factory.mktemp("llama_routed")
    params = {"twin_merging": {"density": 0.25}, "smile": {"k": 8}, "wemoe": {"steps": 0}, "split_merge": {}}
    return {m: build(m, base, experts, root / m, p, words=LLAMA_WORDS) for m, p in params.items()}


# ------------------------------------------------------------------------------ the format


@pytest.mark.parametrize("method", ["twin_merging", "split_merge", "smile", "wemoe"])
def test_folder_layout_and_manifest(bert_outputs, bert_family, method):
    folder = bert_outputs[method]
    assert is_bundle(folder)
    m = read_bundle_manifest(folder)
    names = [e["name"] for e in m["experts"]]
    assert m["method"] == method and names == ["expert_0", "expert_1", "expert_2"]
    assert (folder / "shared" / "config.json").is_file() and list((folder / "shared").glob("*.safetensors"))
    for e in m["experts"]:
        cfg = json.loads((folder / e["adapter"] / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == "shared"
    rcfg = json.loads((folder / "router" / "router_config.json").read_text())
    assert rcfg["classes"] == names and (folder / "router" / "router.safetensors").is_file()
    assert [r["adapter"] for r in m["serving"]["routes"]] == [f"experts/{n}" for n in names]
    st = m["storage"]
    assert st["total_bytes"] == st["shared_bytes"] + sum(st["expert_bytes"].values()) + st["router_bytes"]
    assert st["separate_experts_bytes"] == 3 * st["shared_bytes"]
    assert (folder / "README.md").read_text().count("PeftModel.from_pretrained") == 1
    assert m["experimental"] is (method == "split_merge")
    if method in ("twin_merging", "split_merge"):
        assert 0.0 <= m["router"]["validation_accuracy"] <= 1.0
        assert rcfg["mixing"] == ("softmax" if method == "twin_merging" else "top1")
        # 27 train rows per expert (30 given, 3 held out), 81 rows at batch 64: 2 Adam steps per epoch, 3 epochs
        assert (rcfg["training"]["steps_per_epoch"], rcfg["training"]["steps"]) == (2, 6)
        assert m["router"]["rows"]["train"] == 81 and m["router"]["steps"] == 6
    assert json.loads((folder / "mergelab_output.json").read_text())["kind"] == "routed"


# ------------------------------------------------------------------------------ RoutedModel vs PEFT


@pytest.mark.parametrize("method", ["twin_merging", "split_merge", "smile", "wemoe"])
def test_one_hot_route_equals_peft_with_that_adapter_encoder(bert_outputs, method):
    folder = bert_outputs[method]
    model = RoutedModel.from_pretrained(folder)
    for t, name in enumerate(model.experts):
        with model.fixed_route(t):
            got = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        want = _peft(folder, name)(input_ids=IDS, attention_mask=MASK).last_hidden_state
        assert torch.allclose(got, want, atol=1e-5), (method, name, float((got - want).abs().max()))


@pytest.mark.parametrize("method", ["twin_merging", "split_merge", "smile", "wemoe"])
def test_one_hot_route_equals_peft_causal_lm_and_generate(llama_outputs, method):
    folder = llama_outputs[method]
    model = RoutedModel.from_pretrained(folder)
    assert model.kind == "causal_lm"
    for name in model.experts:
        ref = _peft(folder, name, causal=True)
        with model.fixed_route(name):
            got = model(input_ids=LM_IDS, attention_mask=LM_MASK).logits
            gen = model.generate(input_ids=LM_IDS, attention_mask=LM_MASK, max_new_tokens=4, do_sample=False)
        want = ref(input_ids=LM_IDS, attention_mask=LM_MASK).logits
        assert torch.allclose(got, want, atol=1e-5), (method, name)
        assert torch.equal(
            gen, ref.generate(input_ids=LM_IDS, attention_mask=LM_MASK, max_new_tokens=4, do_sample=False)
        )


def test_mixed_routes_in_one_pass_equal_weight_space_merges_row_by_row(bert_outputs):
    """Soft, different routes per row, one forward: each row equals a model whose weights are
    θ* + Σₜ wₜ (θ̂ₜ − θ*) (θ̂ₜ: PEFT's merge_and_unload of adapter t), in float64."""
    from transformers import AutoModel

    folder = bert_outputs["twin_merging"]
    model = RoutedModel.from_pretrained(folder, dtype=torch.float64)
    names = model.experts
    shared = AutoModel.from_pretrained(str(folder / "shared"), dtype=torch.float64).state_dict()
    recon = [_peft(folder, n, dtype=torch.float64).merge_and_unload().state_dict() for n in names]
    w = torch.tensor([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.1, 0.1, 0.8]], dtype=torch.float64)
    with model.fixed_route(w):
        got = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
    for i in range(3):
        merged = {k: v + sum(w[i, t] * (recon[t][k] - v) for t in range(3)) for k, v in shared.items()}
        ref = AutoModel.from_pretrained(str(folder / "shared"), dtype=torch.float64).eval()
        ref.load_state_dict(merged)
        want = ref(input_ids=IDS[i : i + 1], attention_mask=MASK[i : i + 1]).last_hidden_state
        assert torch.allclose(got[i : i + 1], want, atol=1e-10), float((got[i : i + 1] - want).abs().max())


def test_sequence_router_routes_rows_and_generate_keeps_the_prompt_route(llama_outputs):
    folder = llama_outputs["twin_merging"]
    model = RoutedModel.from_pretrained(folder)
    w = model.route(LM_IDS, LM_MASK)
    assert w.shape == (2, 2) and torch.allclose(w.sum(-1), torch.ones(2))
    logits = model.router_logits(LM_IDS, LM_MASK)
    assert torch.allclose(w, torch.softmax(logits, -1))
    out = model.generate(input_ids=LM_IDS, attention_mask=LM_MASK, max_new_tokens=4, do_sample=False)
    assert torch.allclose(model.last_route, w)  # the prompt's route, kept while decoding
    with model.fixed_route(w):
        fixed = model.generate(input_ids=LM_IDS, attention_mask=LM_MASK, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, fixed)
    # each row alone gives the same tokens as in the mixed batch
    for i in range(2):
        row = model.generate(input_ids=LM_IDS[i : i + 1, LM_MASK[i].argmax() :], max_new_tokens=4, do_sample=False)
        assert torch.equal(row[0, -4:], out[i, -4:])


def test_router_features_at_inference_are_the_training_ones(bert_family, tmp_path):
    """The router was trained on float32 features of each row's first max_length tokens: a model loaded
    in bfloat16 and given longer, padded rows must route on exactly those (built here with transformers)."""
    from transformers import AutoModel

    base, experts = bert_family
    folder = build("twin_merging", base, experts, tmp_path / "twin", {"density": 0.5},
                   router={"epochs": 2, "batch_size": 64, "max_length": 4})  # fmt: skip
    rcfg = json.loads((folder / "router" / "router_config.json").read_text())
    assert rcfg["max_length"] == 4 and rcfg["feature_dtype"] == "float32"
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 10, 3], [0, 0, 2, 12, 13, 14, 15, 3], [2, 16, 17, 3, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 8, [0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0, 0, 0]])
    shared = AutoModel.from_pretrained(str(folder / "shared"), dtype=torch.float32).eval()
    feats = []
    for row, m in zip(ids, mask):
        first = row[m.bool()][:4].unsqueeze(0)  # the row's first 4 real tokens, alone
        feats.append(shared(input_ids=first).last_hidden_state.mean(1))
    for dtype in (torch.float32, torch.bfloat16):
        model = RoutedModel.from_pretrained(folder, dtype=dtype)
        assert next(model.router.parameters()).dtype == torch.float32
        want = model.router(torch.cat(feats))
        got = model.router_logits(ids, mask)
        assert torch.allclose(got.float(), want, atol=1e-4), (dtype, float((got.float() - want).abs().max()))
        model(input_ids=ids, attention_mask=mask)  # the forward routes on the same logits
        assert torch.allclose(model.last_route.float(), torch.softmax(want, -1), atol=1e-4)


def test_smile_routes_each_token(bert_outputs):
    model = RoutedModel.from_pretrained(bert_outputs["smile"])
    model(input_ids=IDS, attention_mask=MASK)
    per_layer = [r for r in model.state.records if r.dim() == 3]  # the pooler routes its [batch, d] input
    assert per_layer and all(r.shape == (3, 5, 3) for r in per_layer)
    assert all(torch.allclose(r.sum(-1), torch.ones(3, 5)) for r in per_layer)
    assert all(int((r > 0).sum(-1).max()) == 1 for r in per_layer)  # top_k 1: one expert per token
    assert model.last_route is not None and model.last_route.shape == (3, 3)


# ------------------------------------------------------------------------------ exactness


def test_twin_full_rank_one_hot_reconstructs_each_expert(bert_family, tmp_path):
    base, experts = bert_family
    folder = build("twin_merging", base, experts, tmp_path / "twin", {"density": 1.0})
    for t, e in enumerate(experts):
        got = expert_state_dict(folder, t)
        want = load_dir(e)
        for k, v in want.items():
            assert torch.allclose(got[k].float(), v.float(), atol=2e-6), k
        model = RoutedModel.from_pretrained(folder)
        from transformers import AutoModel

        ref = AutoModel.from_pretrained(str(e)).eval()
        with model.fixed_route(t):
            assert torch.allclose(
                model(input_ids=IDS, attention_mask=MASK).last_hidden_state,
                ref(input_ids=IDS, attention_mask=MASK).last_hidden_state,
                atol=1e-5,
            )


@pytest.fixture(scope="module")
def classifier_family(tmp_path_factory):
    """A tiny BERT sequence classifier with 2 labels (head [2, 16]) and 2 experts moving every tensor."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from mergelab_bench.zoo.testing import write_tiny_backbone

    root = tmp_path_factory.mktemp("bertcls")
    backbone = write_tiny_backbone(root / "backbone", hidden=16)
    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(str(backbone), num_labels=2)
    base = AutoModelForSequenceClassification.from_config(cfg)
    folders = []
    for i in range(3):
        model = AutoModelForSequenceClassification.from_config(cfg)
        model.load_state_dict(base.state_dict())
        if i:
            gen = torch.Generator().manual_seed(30 + i)
            with torch.no_grad():
                for prm in model.parameters():
                    prm.add_(torch.randn(prm.shape, generator=gen) * 0.05)
        folder = root / ("base" if i == 0 else f"expert_{i - 1}")
        model.save_pretrained(str(folder), safe_serialization=True)
        for f in backbone.iterdir():
            if f.name not in ("config.json", "model.safetensors"):
                shutil.copy(f, folder / f.name)
        folders.append(folder)
    return folders[0], folders[1:]


@pytest.mark.parametrize("zero_rank", ["dense", "drop"])
def test_twin_matrices_of_rank_zero_are_stored_whole_by_default(classifier_family, tmp_path, zero_rank):
    """⌊0.1 · min(m, n)⌋ = 0 for the 2-label head and the 2-row token-type embedding: by default each route
    keeps its expert's tensors there (compared with the expert checkpoints); `drop` keeps θ*'s."""
    base, experts = classifier_family
    params = {"density": 0.1} if zero_rank == "dense" else {"density": 0.1, "zero_rank": "drop"}  # dense: the default
    folder = build("twin_merging", base, experts, tmp_path / "twin", params)
    shared = load_dir(folder / "shared")
    small = ["classifier.weight", "bert.embeddings.token_type_embeddings.weight"]
    for t, e in enumerate(experts):
        got, want = expert_state_dict(folder, t), load_dir(e)
        for k in small:
            expected = want[k] if zero_rank == "dense" else shared[k]
            assert torch.allclose(got[k].float(), expected.float(), atol=1e-6), (zero_rank, t, k)
        assert torch.allclose(got["classifier.bias"], want["classifier.bias"], atol=1e-6)  # biases are routed
        assert not torch.allclose(want["classifier.weight"], shared["classifier.weight"], atol=1e-3)
    if zero_rank == "dense":
        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        cfg = json.loads((folder / "experts" / "expert_0" / "adapter_config.json").read_text())
        assert "classifier" in cfg["modules_to_save"]
        model = RoutedModel.from_pretrained(folder)
        for t in range(len(experts)):
            shared_model = AutoModelForSequenceClassification.from_pretrained(str(folder / "shared"))
            ref = PeftModel.from_pretrained(shared_model, str(folder / "experts" / f"expert_{t}")).eval()
            with model.fixed_route(t):
                got_logits = model(input_ids=IDS, attention_mask=MASK).logits
            want_logits = ref(input_ids=IDS, attention_mask=MASK).logits
            assert torch.allclose(got_logits, want_logits, atol=1e-5), float((got_logits - want_logits).abs().max())


def test_smile_full_rank_reconstructs_experts_that_change_linear_layers(linear_family, tmp_path):
    base, experts = linear_family
    folder = build("smile", base, experts, tmp_path / "smile", {"k": 64})
    for t, e in enumerate(experts):
        got = expert_state_dict(folder, t)
        for k, v in load_dir(e).items():
            assert torch.allclose(got[k].float(), v.float(), atol=2e-6), k


def test_split_merge_one_expert_full_rank_is_exact(bert_family, tmp_path):
    base, experts = bert_family
    folder = build("split_merge", base, experts[:1], tmp_path / "split", {"topk": 1.0, "rank_fraction": 1.0})
    got = expert_state_dict(folder, 0)
    for k, v in load_dir(experts[0]).items():
        assert torch.allclose(got[k].float(), v.float(), atol=2e-6), k


def test_split_merge_identical_experts_have_no_complementary_part(bert_family, tmp_path):
    base, experts = bert_family
    with pytest.raises(MergelabError, match="no low-rank part"):
        build("split_merge", base, [experts[0], experts[0]], tmp_path / "same")


def test_wemoe_gates_learn_from_unlabeled_inputs(bert_family, tmp_path):
    from mergelab.informed import Calibration
    from mergelab.informed.modeling import pool

    base, experts = bert_family
    head = torch.nn.Linear(16, 3)
    torch.nn.init.normal_(head.weight, std=1.0)

    def logits_fn(model, batch):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return head(pool(out.last_hidden_state, batch["attention_mask"], "mean"))

    batches = [{"input_ids": IDS, "attention_mask": MASK}]
    cal = [Calibration(batches=batches, logits_fn=logits_fn) for _ in experts]
    out = mergelab.merge(
        recipe("wemoe", base, experts, {"steps": 3, "lr": 1e-2}), tmp_path / "wemoe", calibration=cal, hash_inputs=False
    ).path
    router = read_bundle_manifest(out)["router"]
    assert router["steps"] == 3 and router["entropy_final"] < router["entropy_initial"]
    gates = load_file(str(out / "router" / "router.safetensors"))
    assert any(k.startswith("base.") for k in gates)
    bias = [v for k, v in gates.items() if k.endswith("fc2.bias")]
    assert bias and not all(torch.allclose(b, torch.full_like(b, 0.3)) for b in bias)  # the gates moved
    model = RoutedModel.from_pretrained(out)
    for t, name in enumerate(model.experts):
        with model.fixed_route(t):
            got = model(input_ids=IDS, attention_mask=MASK).last_hidden_state
        assert torch.allclose(got, _peft(out, name)(input_ids=IDS, attention_mask=MASK).last_hidden_state, atol=1e-5)


def _wemoe_by_hand(base: Path, experts: list[Path], lambdas, block: str, causal: bool) -> torch.nn.Module:
    """θ0 + Σₜ λₜ τₜ in the feed-forward blocks (tensor names matching ``block``), θ0 + 0.3 Σₜ τₜ elsewhere,
    from the checkpoints with transformers, in float64."""
    import re

    from transformers import AutoModel, AutoModelForCausalLM

    cls = AutoModelForCausalLM if causal else AutoModel
    theta0 = cls.from_pretrained(str(base), dtype=torch.float64).state_dict()
    thetas = [cls.from_pretrained(str(e), dtype=torch.float64).state_dict() for e in experts]
    merged = {}
    for k, v in theta0.items():
        coeffs = [float(x) for x in lambdas] if re.search(block, k) else [0.3] * len(experts)
        merged[k] = v + sum(c * (th[k] - v) for c, th in zip(coeffs, thetas)) if v.is_floating_point() else v
    ref = cls.from_pretrained(str(base), dtype=torch.float64).eval()
    ref.load_state_dict(merged)
    return ref


@pytest.mark.parametrize("family", ["bert", "gpt2_square"])
def test_wemoe_mixing_is_theta0_plus_lambda_tau_in_the_blocks(family, bert_outputs, bert_family, request, tmp_path):
    """The initial gates (λ = 0.3 for every expert) give the task-arithmetic model θ0 + 0.3 Στ, and any
    λ gives θ0 + Σ λₜ τₜ in the feed-forward blocks (rows with different λ in one pass); both built by
    hand from the expert checkpoints. A one-hot route cannot tell whether the blocks were rebased."""
    if family == "bert":
        (base, experts), folder = bert_family, bert_outputs["wemoe"]
        block, causal, ids, mask = r"layer\.\d+\.(intermediate|output)\.dense\.", False, IDS, MASK
    else:
        base, experts = request.getfixturevalue("gpt2_square_family")
        folder = build("wemoe", base, experts, tmp_path / "wemoe", {"steps": 0}, words=LLAMA_WORDS)
        block, causal = r"\.mlp\.", True
        ids, mask = torch.tensor([[1, 3, 4, 5], [2, 6, 7, 8], [4, 4, 9, 1]]), torch.ones(3, 4, dtype=torch.long)

    def out(m, i, j):
        o = m(input_ids=ids[i:j], attention_mask=mask[i:j])
        return o.logits if causal else o.last_hidden_state

    model = RoutedModel.from_pretrained(folder, dtype=torch.float64)
    t = len(experts)
    with model.fixed_route([0.3] * t):
        got = out(model, 0, len(ids))
    want = out(_wemoe_by_hand(base, experts, [0.3] * t, block, causal), 0, len(ids))
    assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())
    # the initial gates themselves give λ = 0.3 (their weights are N(0, 0.01): close, not exact)
    gated = out(model, 0, len(ids))
    assert torch.allclose(gated, want, atol=5e-2), float((gated - want).abs().max())

    lam = torch.rand(len(ids), t, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 1.5 - 0.5
    with model.fixed_route(lam):
        got = out(model, 0, len(ids))
    for i in range(len(ids)):
        want = out(_wemoe_by_hand(base, experts, lam[i], block, causal), i, i + 1)
        assert torch.allclose(got[i : i + 1], want, atol=1e-6), (i, float((got[i : i + 1] - want).abs().max()))


def test_wemoe_stores_block_matrices_dense_with_one_lora_module(bert_outputs, bert_family):
    """Full-rank identity factors cost min(m, n)² more than the matrix itself: WEMoE stores each block
    matrix whole (modules_to_save), with one module as factors (PEFT needs a LoRA module)."""
    from transformers import AutoConfig

    folder = bert_outputs["wemoe"]
    cfg = AutoConfig.from_pretrained(str(bert_family[0]))
    d, f = cfg.hidden_size, cfg.intermediate_size
    per_layer = (f * d + f) + (d * f + d)  # intermediate.dense and output.dense, weight + bias
    expected = cfg.num_hidden_layers * per_layer + min(d, f) ** 2  # + the identity of the one LoRA module
    for e in read_bundle_manifest(folder)["experts"]:
        stored = load_file(str(folder / e["adapter"] / "adapter_model.safetensors"))
        assert sum(v.numel() for v in stored.values()) == expected, e["name"]
        acfg = json.loads((folder / e["adapter"] / "adapter_config.json").read_text())
        assert len(acfg["modules_to_save"]) == 2 * cfg.num_hidden_layers - 1


def test_wemoe_expert_pass_keeps_no_base_tensors(bert_family, tmp_path, monkeypatch):
    """Pass 2 holds one module's tensors at a time: the base block tensors router/ needs are read
    again in pass 3, not gathered while the adapters are written."""
    from mergelab.routed import build as build_mod

    seen = {}
    original = build_mod._Builder.router

    def spy(self, *args, **kwargs):
        seen["extras"] = sorted(self.extras)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(build_mod._Builder, "router", spy)
    base, experts = bert_family
    folder = build("wemoe", base, experts, tmp_path / "wemoe", {"steps": 0})
    assert seen["extras"] == []
    gates = load_file(str(folder / "router" / "router.safetensors"))
    want = load_dir(base)
    bases = {k[len("base.") :]: v for k, v in gates.items() if k.startswith("base.")}
    assert bases and all(torch.equal(v, want[k]) for k, v in bases.items())


# ------------------------------------------------------------------------------ extract, round trip


def test_extract_equals_peft_merge_and_unload_and_loads_with_transformers(bert_outputs, tmp_path):
    from transformers import AutoModel

    folder = bert_outputs["twin_merging"]
    res = CliRunner().invoke(app, ["extract", str(folder), "expert_1", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output
    got = load_dir(tmp_path / "x")
    want = _peft(folder, "expert_1").merge_and_unload().state_dict()
    for k, v in got.items():
        assert torch.allclose(v, want[k], atol=1e-6), k
    AutoModel.from_pretrained(str(tmp_path / "x"))  # a plain checkpoint
    listing = CliRunner().invoke(app, ["routed", str(folder)])
    assert listing.exit_code == 0 and "expert_1" in listing.output and "storage" in listing.output


def test_save_load_round_trip(bert_outputs, tmp_path):
    src = bert_outputs["twin_merging"]
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    a = RoutedModel.from_pretrained(src)
    b = RoutedModel.from_pretrained(copy)
    out_a = a(input_ids=IDS, attention_mask=MASK).last_hidden_state
    out_b = b(input_ids=IDS, attention_mask=MASK).last_hidden_state
    assert torch.equal(out_a, out_b) and torch.equal(a.last_route, b.last_route)
    assert a.router is not None and b.router is not None
    sa, sb = a.router.state_dict(), b.router.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ routed TALL masks / EMR


@pytest.mark.parametrize("method", ["tall_masks", "emr"])
def test_tall_emr_with_a_router_run_without_the_task_id(tied_family, tmp_path, method):
    from transformers import AutoModelForCausalLM

    from mergelab.routed import task_state_dict

    base, experts = tied_family
    out = build(method, base, experts, tmp_path / method, words=LLAMA_WORDS, router={"epochs": 3})
    manifest = json.loads((out / "routed" / "manifest.json").read_text())
    assert manifest["router"]["kind"] == "sequence_mlp" and manifest["router"]["mixing"] == "top1"
    model = RoutedModel.from_pretrained(out)
    routed = model(input_ids=LM_IDS, attention_mask=LM_MASK).logits
    route = model.last_route
    assert route is not None and torch.equal(route.sum(-1), torch.ones(2))
    for t in range(2):
        ref = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        ref.load_state_dict(task_state_dict(out, t), strict=False)
        want = ref(input_ids=LM_IDS, attention_mask=LM_MASK).logits
        with model.fixed_route(t):
            assert torch.allclose(model(input_ids=LM_IDS, attention_mask=LM_MASK).logits, want, atol=1e-5)
        rows = route[:, t] == 1
        assert torch.allclose(routed[rows], want[rows], atol=1e-5)


def test_tall_without_a_router_needs_the_task(family, tmp_path):
    base, experts = family
    out = mergelab.merge(recipe("tall_masks", base, experts), tmp_path / "tall", hash_inputs=False).path
    model = RoutedModel.from_pretrained(out)
    with pytest.raises(OptionError, match="no router"):
        model(input_ids=LM_IDS)
    with model.fixed_route(1):
        model(input_ids=LM_IDS)


# ------------------------------------------------------------------------------ router data


def test_router_reads_train_and_validation_rows_never_test(zoo_manifest, tmp_path):
    from mergelab_bench.zoo.build import load_zoo

    zoo = load_zoo(zoo_manifest)
    experts = [zoo.expert_model_dir(t) for t in zoo.tasks]
    rec = recipe("twin_merging", zoo.base_dir, experts, {"density": 0.25}, router={"epochs": 2})
    for m, task in zip(rec["models"], zoo.tasks):
        m["calibration"] = {"zoo_task": task, "zoo": str(zoo_manifest), "split": "train"}
        m["validation"] = {"zoo_task": task, "zoo": str(zoo_manifest), "split": "validation"}
    out = mergelab.merge(rec, tmp_path / "twin", hash_inputs=False).path
    data = json.loads((out / "router" / "router_data.json").read_text())
    for entry, task in zip(data["experts"], zoo.tasks):
        keys = {s: {r["key"] for r in zoo.data(task).rows(s)} for s in ("train", "validation", "test")}
        assert entry["train"]["ids"] and set(entry["train"]["ids"]) <= keys["train"]
        assert entry["validation"]["ids"] and set(entry["validation"]["ids"]) <= keys["validation"]
        used = set(entry["train"]["ids"]) | set(entry["validation"]["ids"])
        assert not used & keys["test"]
    rec["models"][0]["validation"] = {"zoo_task": zoo.tasks[0], "zoo": str(zoo_manifest), "split": "test"}
    with pytest.raises(RecipeError, match="test split"):
        mergelab.merge(rec, tmp_path / "leak", hash_inputs=False)
    assert not (tmp_path / "leak").exists()


# ------------------------------------------------------------------------------ bad inputs


def test_router_classes_must_be_the_experts(bert_outputs, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(bert_outputs["twin_merging"], copy)
    cfg_path = copy / "router" / "router_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["classes"] = cfg["classes"][:2]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as exc:
        RoutedModel.from_pretrained(copy)
    assert "\n" not in str(exc.value) and "router's classes" in str(exc.value)


def test_missing_adapter_is_one_line(bert_outputs, tmp_path):
    copy = tmp_path / "c"
    shutil.copytree(bert_outputs["twin_merging"], copy)
    shutil.rmtree(copy / "experts" / "expert_2")
    with pytest.raises(CheckpointError) as exc:
        RoutedModel.from_pretrained(copy)
    assert "\n" not in str(exc.value) and "expert_2" in str(exc.value)
    res = CliRunner().invoke(app, ["extract", str(copy), "expert_0", str(tmp_path / "x")])
    assert res.exit_code == CheckpointError.exit_code and len(res.output.strip().splitlines()) == 1


def test_bad_parameters_and_sources_are_refused_before_any_work(bert_family, tmp_path):
    base, experts = bert_family
    with pytest.raises(ParameterError, match="density"):
        mergelab.merge(recipe("twin_merging", base, experts, {"density": 2.0}), tmp_path / "a")
    with pytest.raises(RecipeError, match="calibration"):
        mergelab.merge(recipe("twin_merging", base, experts), tmp_path / "b")  # no router rows
    with pytest.raises(RecipeError, match="router"):
        mergelab.merge(recipe("ties", base, experts, router={"epochs": 1}), tmp_path / "c", router_data=router_texts(3))
    with pytest.raises(OptionError, match="router_data"):
        mergelab.merge(recipe("twin_merging", base, experts), tmp_path / "d", router_data=router_texts(2))
    for kwargs in ({"adapter_out": True}, {"rank": 8}, {"energy": 0.9}):  # never silently a routed folder
        with pytest.raises(OptionError, match="routed-model folder"):
            mergelab.merge(recipe("smile", base, experts), tmp_path / "e", router_data=router_texts(3), **kwargs)
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_mixing_is_set_in_the_router_block_only(bert_family, tmp_path):
    base, experts = bert_family
    with pytest.raises(ParameterError, match=r"mixing is not a method parameter.*router: block") as err:
        mergelab.merge(
            recipe("twin_merging", base, experts, {"mixing": "top1"}), tmp_path / "a", router_data=router_texts(3)
        )
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="mixing: topk needs top_k"):
        mergelab.merge(
            recipe("twin_merging", base, experts, router={"mixing": "topk"}),
            tmp_path / "b",
            router_data=router_texts(3),
        )
    assert not any((tmp_path / n).exists() for n in "ab")


def test_serving_entry_reads_the_resolved_mixing():
    from mergelab.routed.build import ROUTED_METHODS, serving_entry

    twin, split = ROUTED_METHODS["twin_merging"], ROUTED_METHODS["split_merge"]
    assert serving_entry(twin, ["a", "b"], "top1")["top1_is_the_method"] is True
    assert serving_entry(split, ["a", "b"], "softmax")["top1_is_the_method"] is False
    assert "approximates" in serving_entry(split, ["a", "b"], "softmax")["note"]
    assert serving_entry(ROUTED_METHODS["smile"], ["a", "b"], "top1")["top1_is_the_method"] is False


@pytest.mark.parametrize(
    ("method", "mixing", "exact"), [("twin_merging", "top1", True), ("split_merge", "softmax", False)]
)
def test_serving_says_top1_is_the_method_from_the_router_block(bert_family, tmp_path, method, mixing, exact):
    """The method's default mixing is twin softmax / split top1; the router: block overrides it, and the
    manifest's serving entry must follow the mixing the router actually uses."""
    base, experts = bert_family
    params = {"density": 0.5} if method == "twin_merging" else {}
    folder = build(
        method, base, experts, tmp_path / method, params, router={"epochs": 2, "batch_size": 64, "mixing": mixing}
    )
    m = read_bundle_manifest(folder)
    rcfg = json.loads((folder / "router" / "router_config.json").read_text())
    assert rcfg["mixing"] == mixing and m["routing"]["mixing"] == mixing
    assert m["serving"]["top1_is_the_method"] is exact


def test_recipe_file_through_the_cli(bert_family, tmp_path):
    import yaml

    base, experts = bert_family
    texts = router_texts(3)
    models = []
    for i, e in enumerate(experts):
        data = tmp_path / f"rows_{i}.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i].train))
        models.append({"model": str(e), "calibration": str(data)})
    rec = {"merge_method": "twin_merging", "base_model": str(base), "models": models, "router": {"epochs": 2}}
    path = tmp_path / "twin.yaml"
    path.write_text(yaml.safe_dump(rec))
    res = CliRunner().invoke(app, ["merge", str(path), str(tmp_path / "out"), "-q", "--no-hash-inputs"])
    assert res.exit_code == 0, res.output
    assert is_bundle(tmp_path / "out") and "storage" in res.output
    v = CliRunner().invoke(app, ["validate", str(path)])
    assert v.exit_code == 0, v.output


def test_twin_shared_model_is_any_registered_merge(bert_family, tmp_path):
    base, experts = bert_family
    params = {"density": 0.5, "shared_method": "ties", "shared_parameters": {"lambda": 1.0}}
    folder = build("twin_merging", base, experts, tmp_path / "twin", params)
    ties = mergelab.merge(recipe("ties", base, experts, {"lambda": 1.0}), tmp_path / "ties", hash_inputs=False).path
    got, want = load_dir(folder / "shared"), load_dir(ties)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert read_bundle_manifest(folder)["shared"]["method"] == "ties"


def _gpt2(root: Path, n_inner: int | None = None) -> tuple[Path, list[Path]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from mergelab.synthetic import make_expert, make_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=32, n_inner=n_inner)
    GPT2LMHeadModel(cfg).save_pretrained(str(root / "base"))
    make_tokenizer(root / "base", vocab_size=32)
    return root / "base", [make_expert(root / "base", root / f"expert_{i}", seed=i + 1) for i in range(2)]


@pytest.fixture(scope="module")
def gpt2_family(tmp_path_factory):
    """GPT-2 with Conv1D layers of other fan-in and fan-out (the MLP is 16 -> 64 -> 16)."""
    return _gpt2(tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def gpt2_square_family(tmp_path_factory):
    """GPT-2 whose MLP Conv1D layers are square (16 -> 16 -> 16): a transposed update has the right shape."""
    return _gpt2(tmp_path_factory.mktemp("gpt2sq"), n_inner=16)


@pytest.mark.parametrize("method", ["twin_merging", "smile", "wemoe"])
def test_gpt2_conv1d_and_tied_head(gpt2_family, tmp_path, method):
    base, experts = gpt2_family
    params = {"twin_merging": {"density": 0.5}, "smile": {"k": 4}, "wemoe": {"steps": 0}}[method]
    folder = build(method, base, experts, tmp_path / method, params, words=LLAMA_WORDS)
    cfg = json.loads((folder / "experts" / "expert_0" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    model = RoutedModel.from_pretrained(folder)
    ids = torch.tensor([[1, 3, 4, 5], [2, 6, 7, 8]])
    for name in model.experts:
        ref = _peft(folder, name, causal=True)
        with model.fixed_route(name):
            got = model(input_ids=ids).logits
            gen = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
        assert torch.allclose(got, ref(input_ids=ids).logits, atol=1e-5), name
        assert torch.equal(gen, ref.generate(input_ids=ids, max_new_tokens=3, do_sample=False))


def test_tied_embedding_expert_merges_with_peft_and_extracts_the_same(llama_outputs):
    """A tied embedding is stored whole with its head's copy: PEFT's forward, PEFT's merge_and_unload
    and mergelab extract agree (an embedding LoRA would be applied twice by merge_and_unload)."""
    folder = llama_outputs["twin_merging"]
    cfg = json.loads((folder / "experts" / "expert_0" / "adapter_config.json").read_text())
    assert "model.embed_tokens" in (cfg["modules_to_save"] or []) and "lm_head" in cfg["modules_to_save"]
    want = _peft(folder, "expert_0", causal=True)(input_ids=LM_IDS).logits
    merged = _peft(folder, "expert_0", causal=True).merge_and_unload()
    assert torch.allclose(merged(input_ids=LM_IDS).logits, want, atol=1e-5)
    sd = expert_state_dict(folder, "expert_0")
    assert torch.allclose(sd["model.embed_tokens.weight"], merged.model.embed_tokens.weight, atol=1e-6)
