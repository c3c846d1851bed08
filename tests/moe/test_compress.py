"""Compressing an MoE (``mergelab moe-compress``): M-SMoE groups and weights by hand, the data phase
against transformers' own router logits, K = N, pruning, layouts, alignment, Sub-MoE invariants, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from moe_helpers import dense_base, load_strict, tiny_moe
from safetensors.torch import save_file
from tiny_models import load_dir
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.moe import compress
from mergelab.moe.grouping import LayerGroups, router_rows
from mergelab.moe.msmoe import global_group_counts, matching_permutation, permute_expert
from mergelab.moe.routing import RoutingStats
from mergelab.moe.submoe import cluster_experts, union_merge

runner = CliRunner()
W = ("w1", "w2", "w3")


def _expert(layer: int, e: int, w: str) -> str:
    return f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"


def _router(layer: int) -> str:
    return f"model.layers.{layer}.block_sparse_moe.gate.weight"


def hand_statistics() -> RoutingStats:
    """Layer 0: usage 0.1/0.4/0.3/0.2, cores 1 and 2; expert 3 is closest to core 1 (0.9 vs 0.2) and
    expert 0 to core 2 (0.5 vs 0.1): groups {0, 2} and {1, 3}. Layer 1: equal usage, cores 0 and 1
    (lower index first); expert 2 is closest to core 1 (0.7 vs 0.3); expert 3 ties (0.6 both) and
    joins the more used core 0: groups {0, 3} and {1, 2}. The Gram matrices are given as cosines."""
    s0 = torch.tensor([[1, 0.1, 0.5, 0.3], [0.1, 1, 0.2, 0.9], [0.5, 0.2, 1, 0.2], [0.3, 0.9, 0.2, 1]])
    s1 = torch.tensor([[1, 0.2, 0.3, 0.6], [0.2, 1, 0.7, 0.6], [0.3, 0.7, 1, 0.1], [0.6, 0.6, 0.1, 1]])
    return RoutingStats(
        num_experts=4,
        top_k=2,
        tokens=50,
        counts={0: torch.tensor([10.0, 40, 30, 20]), 1: torch.tensor([25.0, 25, 25, 25])},
        logit_gram={0: s0, 1: s1},
    )


GROUPS = {0: [[0, 2], [1, 3]], 1: [[0, 3], [1, 2]]}
WEIGHTS = {  # per layer, expert -> its weight inside its group (usage / group usage)
    0: {0: 0.1 / 0.4, 2: 0.3 / 0.4, 1: 0.4 / 0.6, 3: 0.2 / 0.6},
    1: {0: 0.5, 3: 0.5, 1: 0.5, 2: 0.5},
}


def test_msmoe_groups_and_weights_equal_a_hand_computation(mixtral, tmp_path):
    res = compress(mixtral, tmp_path / "out", to=2, statistics=hand_statistics())
    assert {int(k): v["groups"] for k, v in res.report["groups"].items()} == GROUPS
    assert res.report["layout"] == "shared" and res.report["experts_per_layer"] == {"0": 2, "1": 2}
    src, out = load_dir(mixtral), load_dir(tmp_path / "out")
    for layer, groups in GROUPS.items():
        for members in groups:
            for w in W:
                want = sum(WEIGHTS[layer][e] * src[_expert(layer, e, w)] for e in members)
                for e in members:  # every member's slot holds the merged expert
                    torch.testing.assert_close(out[_expert(layer, e, w)], want, atol=1e-6, rtol=0)
        assert torch.equal(out[_router(layer)], src[_router(layer)])  # the router is unchanged
    for name, t in src.items():
        if ".experts." not in name:
            assert torch.equal(out[name], t), name
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (mixtral / "config.json").read_text()
    )
    load_strict(tmp_path / "out")


def test_routing_statistics_match_transformers_router_logits(mixtral, calibration_file, tmp_path):
    """Counts and router-logit Grams of the data phase (padded batches, pre-hooks) against
    transformers' output_router_logits on one unpadded line at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = compress(mixtral, tmp_path / "out", to=4, calibration=str(calibration_file), batch_size=5)
    stats = res.statistics
    tok = AutoTokenizer.from_pretrained(str(mixtral))
    model = AutoModelForCausalLM.from_pretrained(str(mixtral)).eval()
    counts = {layer: torch.zeros(4, dtype=torch.float64) for layer in range(2)}
    grams = {layer: torch.zeros(4, 4, dtype=torch.float64) for layer in range(2)}
    tokens = 0
    for line in calibration_file.read_text().splitlines():
        ids = torch.tensor([tok(line)["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids, output_router_logits=True).router_logits
        tokens += ids.shape[1]
        for layer in range(2):
            lg = logits[layer].double()
            for e in lg.topk(2, dim=-1).indices.reshape(-1).tolist():
                counts[layer][e] += 1
            grams[layer] += lg.T @ lg
    assert stats.tokens == tokens
    for layer in range(2):
        assert torch.equal(stats.counts[layer], counts[layer])
        torch.testing.assert_close(stats.logit_gram[layer], grams[layer], rtol=1e-5, atol=1e-6)
    assert res.report["statistics"]["tokens"] == tokens


@pytest.mark.parametrize("method", ["msmoe", "submoe", "prune-frequency"])
def test_k_equals_n_returns_the_input(mixtral, tmp_path, method):
    stats = hand_statistics()
    stats.output_gram = dict(stats.logit_gram)
    res = compress(mixtral, tmp_path / "out", to=4, method=method, statistics=stats, align=method == "msmoe")
    src, out = load_dir(mixtral), load_dir(res.path)
    assert src.keys() == out.keys()
    assert all(torch.equal(src[n], out[n]) for n in src)
    assert json.loads((res.path / "config.json").read_text())["num_local_experts"] == 4


def test_prune_frequency_keeps_the_most_used_experts(mixtral, tmp_path):
    res = compress(mixtral, tmp_path / "out", to=2, method="prune-frequency", statistics=hand_statistics())
    kept = {0: [1, 2], 1: [0, 1]}  # layer 0: usage 0.4 and 0.3; layer 1: a tie, the lower indices
    src, out = load_dir(mixtral), load_dir(res.path)
    for layer, ks in kept.items():
        assert res.report["groups"][str(layer)]["dropped"] == [e for e in range(4) if e not in ks]
        assert torch.equal(out[_router(layer)], src[_router(layer)][ks])
        for slot, e in enumerate(ks):
            for w in W:
                assert torch.equal(out[_expert(layer, slot, w)], src[_expert(layer, e, w)])
        assert _expert(layer, 2, "w1") not in out
    assert json.loads((res.path / "config.json").read_text())["num_local_experts"] == 2
    load_strict(res.path)


@pytest.mark.parametrize("rule", ["weighted", "sum", "dominant"])
def test_distinct_layout_writes_k_experts_and_reduced_routers(mixtral, tmp_path, rule):
    res = compress(mixtral, tmp_path / "out", to=2, layout="distinct", router_rows=rule, statistics=hand_statistics())
    src, out = load_dir(mixtral), load_dir(res.path)
    cores = {0: [2, 1], 1: [0, 1]}  # the core of each group (groups ordered by their first member)
    for layer, groups in GROUPS.items():
        r = src[_router(layer)]
        for slot, members in enumerate(groups):
            if rule == "weighted":
                want = sum(WEIGHTS[layer][e] * r[e] for e in members)
            elif rule == "sum":
                want = sum(r[e] for e in members)
            else:
                want = r[cores[layer][slot]]
            torch.testing.assert_close(out[_router(layer)][slot], want, atol=1e-6, rtol=0)
            merged = sum(WEIGHTS[layer][e] * src[_expert(layer, e, "w2")] for e in members)
            torch.testing.assert_close(out[_expert(layer, slot, "w2")], merged, atol=1e-6, rtol=0)
    assert json.loads((res.path / "config.json").read_text())["num_local_experts"] == 2
    load_strict(res.path)


def test_global_group_counts_hand_computation():
    """Most used expert of each layer forced to 1; threshold = the 6th largest (index K·L = 6) of all."""
    freqs = {
        0: torch.tensor([0.5, 0.3, 0.15, 0.05]),
        1: torch.tensor([0.2, 0.45, 0.25, 0.1]),
        2: torch.tensor([0.7, 0.12, 0.1, 0.08]),
    }
    # forced: [1, .3, .15, .05], [.2, 1, .25, .1], [1, .12, .1, .08]
    # sorted: 1, 1, 1, .3, .25, .2, .15, .12, ... -> index 6 is .15 -> keep values > .15
    assert global_group_counts(freqs, 2) == {0: 2, 1: 3, 2: 1}


def test_matching_permutation_recovers_a_permuted_expert():
    gen = torch.Generator().manual_seed(0)
    gate, up, down = (
        torch.randn(16, 8, generator=gen),
        torch.randn(16, 8, generator=gen),
        torch.randn(8, 16, generator=gen),
    )
    perm = torch.randperm(16, generator=gen)
    shuffled = (gate[perm], up[perm], down[:, perm])
    p = matching_permutation((gate, up, down), shuffled)
    aligned = permute_expert(shuffled, p)
    assert all(torch.equal(a, b) for a, b in zip(aligned, (gate, up, down)))
    x = torch.randn(5, 8, generator=gen)

    def f(e):
        return (torch.nn.functional.silu(x @ e[0].T) * (x @ e[1].T)) @ e[2].T

    torch.testing.assert_close(f(shuffled), f((gate, up, down)))


def test_align_merges_a_permuted_copy_back_into_its_original(mixtral, tmp_path):
    """Expert 3 of layer 0 is expert 1 with its hidden units shuffled (the same function): with
    --align the group {1, 3} merges to expert 1 exactly; without, to a different matrix."""
    moe = tmp_path / "moe"
    shutil.copytree(mixtral, moe)
    state = load_dir(moe)
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(3))
    state[_expert(0, 3, "w1")] = state[_expert(0, 1, "w1")][perm].clone()
    state[_expert(0, 3, "w3")] = state[_expert(0, 1, "w3")][perm].clone()
    state[_expert(0, 3, "w2")] = state[_expert(0, 1, "w2")][:, perm].clone()
    save_file(state, str(moe / "model.safetensors"), metadata={"format": "pt"})
    aligned = compress(moe, tmp_path / "a", to=2, statistics=hand_statistics(), align=True)
    plain = compress(moe, tmp_path / "p", to=2, statistics=hand_statistics())
    a, p = load_dir(aligned.path), load_dir(plain.path)
    for w in W:
        torch.testing.assert_close(a[_expert(0, 3, w)], state[_expert(0, 1, w)], atol=1e-6, rtol=0)
        assert not torch.allclose(p[_expert(0, 3, w)], state[_expert(0, 1, w)], atol=1e-3)


def test_submoe_union_merge_invariants():
    gen = torch.Generator().manual_seed(1)
    ws = [torch.randn(12, 20, generator=gen) for _ in range(3)]
    f = [0.5, 0.3, 0.2]
    mean = sum(fi * wi for fi, wi in zip(f, ws))
    torch.testing.assert_close(union_merge(ws, f), mean, atol=1e-5, rtol=0)  # full rank: the weighted mean
    torch.testing.assert_close(union_merge(ws, [5.0, 3.0, 2.0]), mean, atol=1e-5, rtol=0)  # weights normalised
    u = torch.linalg.svd(torch.cat(ws, dim=1).double(), full_matrices=False).U[:, :4]
    projected = (u @ u.T @ mean.double()).float()  # rank 4: the mean projected on the shared top-4 output basis
    torch.testing.assert_close(union_merge(ws, f, rank=4), projected, atol=1e-5, rtol=0)
    assert torch.linalg.matrix_rank(union_merge(ws, f, rank=4)) == 4
    assert union_merge(ws[:1], [1.0]) is ws[0]


def test_submoe_clusters_recover_blocks_of_similar_experts():
    """Two blocks of experts with similar outputs ({0, 2, 4}, {1, 3, 5}); K = 2 finds them."""
    sim = torch.full((6, 6), 0.05)
    for block in ([0, 2, 4], [1, 3, 5]):
        for i in block:
            for j in block:
                sim[i, j] = 0.9
    sim.fill_diagonal_(1.0)
    freq = torch.tensor([0.3, 0.05, 0.2, 0.25, 0.1, 0.1])
    g = cluster_experts(sim, freq, 2)
    assert [list(x) for x in g.groups] == [[0, 2, 4], [1, 3, 5]]
    assert list(g.cores) == [0, 3]  # the most used member of each


def test_router_rows_rules():
    router = torch.arange(12.0).reshape(4, 3)
    groups = LayerGroups(4, ((0, 2), (1, 3)), (2, 1))
    freq = torch.tensor([0.1, 0.4, 0.3, 0.2])
    torch.testing.assert_close(
        router_rows(router, groups, freq, "sum").float(), torch.stack([router[0] + router[2], router[1] + router[3]])
    )
    torch.testing.assert_close(
        router_rows(router, groups, freq, "dominant").float(), torch.stack([router[2], router[1]])
    )
    want = torch.stack([0.25 * router[0] + 0.75 * router[2], (0.4 * router[1] + 0.2 * router[3]) / 0.6])
    torch.testing.assert_close(router_rows(router, groups, freq, "weighted").float(), want)


@pytest.mark.parametrize(
    ("kind", "method", "layout"),
    [
        ("qwen2_moe", "msmoe", "shared"),
        ("qwen3_moe", "msmoe", "distinct"),
        ("qwen3_moe", "submoe", None),
    ],
)
def test_qwen_moes_compress_to_loadable_checkpoints(tmp_path, calibration_file, kind, method, layout):
    moe = tiny_moe(tmp_path / "moe", kind)
    res = compress(moe, tmp_path / "out", to=2, method=method, layout=layout, calibration=str(calibration_file))
    assert res.report["experimental"] == (method == "submoe")
    cfg = json.loads((res.path / "config.json").read_text())
    count = cfg.get("num_experts", cfg.get("num_local_experts"))
    assert count == (2 if layout == "distinct" else 4)
    src, out = load_dir(moe), load_dir(res.path)
    for name, t in src.items():  # shared expert, attention, norms: unchanged
        if ".mlp.experts." not in name and ".mlp.gate." not in name:
            assert torch.equal(out[name], t), name
    model = load_strict(res.path)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 3, 4, 5]])).logits).all()


def test_cli_compresses_and_prints_the_report(mixtral, calibration_file, tmp_path):
    res = runner.invoke(
        app,
        [
            "moe-compress",
            str(mixtral),
            str(tmp_path / "out"),
            "--to",
            "2",
            "--calibration",
            str(calibration_file),
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    assert '"method": "msmoe"' in res.output and "compressed" in res.output
    report = json.loads((tmp_path / "out" / "moe_compress.json").read_text())
    assert all(len(g["groups"]) == 2 for g in report["groups"].values())


def test_bad_inputs_are_one_line_errors(mixtral, calibration_file, tmp_path):
    dense = dense_base(tmp_path / "dense", "llama")
    cal = ["--calibration", str(calibration_file)]
    cases = [
        ([str(mixtral), "--to", "5", *cal], 2, ["--to 5", "has 4 experts per layer"]),
        ([str(mixtral), "--to", "1", "--layout", "distinct", *cal], 2, ["fewer experts than the 2"]),
        ([str(mixtral), "--to", "2"], 2, ["--calibration"]),
        (
            [str(mixtral), "--to", "2", "--method", "prune-frequency", "--layout", "shared", *cal],
            2,
            ["layout is distinct"],
        ),
        ([str(mixtral), "--to", "2", "--grouping", "global", "--layout", "distinct", *cal], 2, ["global grouping"]),
        ([str(mixtral), "--to", "2", "--rank", "4", *cal], 2, ["--rank"]),
        ([str(mixtral), "--to", "2", "--method", "nope", *cal], 2, ["method"]),
        ([str(dense), "--to", "2", *cal], 4, ["model_type 'llama'", "Mixtral"]),
        ([str(mixtral), "--to", "2", "--calibration", str(tmp_path / "none.txt")], 2, ["calibration file not found"]),
    ]
    for i, (args, code, needles) in enumerate(cases):
        out = tmp_path / f"out{i}"
        res = runner.invoke(app, ["moe-compress", args[0], str(out), *args[1:], "-q"])
        assert res.exit_code == code, (args, res.output)
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in res.output, res.output
        for n in needles:
            assert n in errors[0], (n, errors[0])
        assert not out.exists()


def test_output_is_atomic_and_force_replaces_only_mergelab_outputs(mixtral, tmp_path, monkeypatch):
    from mergelab.errors import OutputError
    from mergelab.moe import msmoe

    out = tmp_path / "out"
    compress(mixtral, out, to=2, statistics=hand_statistics())
    with pytest.raises(OutputError, match="exists"):
        compress(mixtral, out, to=3, statistics=hand_statistics())
    res = compress(mixtral, out, to=3, statistics=hand_statistics(), force=True)
    assert res.report["experts_per_layer"] == {"0": 3, "1": 3}

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(msmoe, "frequency_weighted_merge", broken)
    with pytest.raises(RuntimeError, match="injected"):
        compress(mixtral, tmp_path / "new", to=2, statistics=hand_statistics())
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    with pytest.raises(OutputError, match="is the MoE"):
        compress(mixtral, mixtral, to=2, statistics=hand_statistics(), force=True)


class _ToyMoe(torch.nn.Module):
    """Hidden state of token t = e_t (one-hot), two 'MoE blocks' that return their input; ``pack``
    drops the pads before the blocks (as a model that packs tokens would)."""

    def __init__(self, vocab: int, pack: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(vocab))
        self.blocks = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
        self.pack = pack

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        if self.pack:
            x = x[attention_mask.bool()]
        for b in self.blocks:
            x = b(x)
        return x


def _toy_batches(vocab: int):
    """4 batches of 2 rows × 5 positions, right-padded; token ids 1.. in order of appearance (0: pad)."""
    batches, nxt = [], 1
    for lengths in ((5, 3), (4, 5), (2, 5), (5, 4)):
        ids = torch.zeros(2, 5, dtype=torch.long)
        mask = torch.zeros(2, 5, dtype=torch.long)
        for r, n in enumerate(lengths):
            ids[r, :n] = torch.arange(nxt, nxt + n)
            mask[r, :n] = 1
            nxt += n
        batches.append({"input_ids": ids, "attention_mask": mask})
    assert nxt - 1 == 33 and nxt <= vocab
    return batches


def test_sub_moe_output_tokens_are_spread_over_every_batch():
    """6 of the 33 real tokens, evenly spaced over all batches (by hand: ⌊(i + ½)·33/6⌋ = 2, 8, 13, 19, 24, 30,
    i.e. token ids 3, 9, 14, 20, 25, 31), the same in every layer and on every run; never a pad."""
    from types import SimpleNamespace

    from mergelab.moe.routing import collect_routing

    vocab = 40
    arch = SimpleNamespace(modules=("blocks.{layer}",))
    routers = {0: torch.randn(4, vocab), 1: torch.randn(4, vocab)}
    runs = []
    for _ in range(2):
        stats, kept = collect_routing(
            _ToyMoe(vocab), _toy_batches(vocab), arch=arch, routers=routers, top_k=2,
            device=torch.device("cpu"), output_tokens=6,
        )  # fmt: skip
        runs.append({layer: x.argmax(-1).tolist() for layer, x in kept.items()})
    assert runs[0] == runs[1] == {0: [3, 9, 14, 20, 25, 31], 1: [3, 9, 14, 20, 25, 31]}
    assert stats.tokens == 33 and all(float(c.sum()) == 33 * 2 for c in stats.counts.values())
    _, kept = collect_routing(
        _ToyMoe(vocab), _toy_batches(vocab), arch=arch, routers=routers, top_k=2, device=torch.device("cpu"),
        output_tokens=100,
    )  # fmt: skip
    assert kept[0].argmax(-1).tolist() == list(range(1, 34))  # fewer real tokens than asked: all of them


def test_a_block_that_receives_packed_tokens_is_refused_in_one_line():
    from types import SimpleNamespace

    from mergelab.errors import PlanError
    from mergelab.moe.routing import collect_routing

    vocab = 40
    with pytest.raises(
        PlanError, match=r"layer 0: the MoE block received 8 token rows for a batch of 10 positions"
    ) as err:
        collect_routing(
            _ToyMoe(vocab, pack=True), _toy_batches(vocab)[:1], arch=SimpleNamespace(modules=("blocks.{layer}",)),
            routers={0: torch.randn(4, vocab)}, top_k=2, device=torch.device("cpu"),
        )  # fmt: skip
    assert "\n" not in str(err.value)
