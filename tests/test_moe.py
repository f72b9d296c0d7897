"""moe_param_groups, routing_metrics and TinyMoE: exact values on hand-made inputs, roles, errors."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

from ray_metaopt import TinyMoE, moe_param_groups, routing_metrics
from ray_metaopt.moe import ROUTING_METRIC_KEYS

LN2, LN4 = math.log(2), math.log(4)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: several torch threads only contend with the other test processes.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _h(*ps):
    return -sum(p * math.log(p) for p in ps if p > 0)


# --------------------------------------------------------------------------- routing_metrics values
EYE4 = torch.eye(4, dtype=torch.float64)
HALF = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64).repeat(4, 1)

# (probs, kwargs, expected {entropy, sparsity, load_violation, specialization})
ROUTING_CASES = [
    pytest.param(torch.full((6, 4), 0.25, dtype=torch.float64), {}, (1.0, 0.0, 3.0, 0.0), id="uniform"),
    pytest.param(EYE4, {}, (0.0, 1.0, 0.0, 1.0), id="one-hot-balanced"),
    pytest.param(EYE4[[2, 2, 2, 2]], {}, (0.0, 1.0, 3.0, 0.0), id="one-hot-collapsed"),
    # each token 50/50 on experts 0,1: H = ln2/ln4; 2 of the 3 non-leading experts near zero
    pytest.param(HALF, {}, (0.5, 2 / 3, 3.0, 0.0), id="half-half"),
    pytest.param(HALF, {"top_k": 2}, (0.5, 2 / 3, 1.0, 0.0), id="half-half-top2"),
    pytest.param(EYE4, {"labels": torch.tensor([0, 1, 2, 3])}, (0.0, 1.0, 0.0, 1.0), id="labels-one-to-one"),
    # two clusters each split evenly over two experts: every expert is pure -> U(C|X) = 1
    pytest.param(EYE4, {"labels": torch.tensor([0, 0, 1, 1])}, (0.0, 1.0, 0.0, 1.0), id="labels-pure-experts"),
    # each cluster spread over all experts: routing says nothing about the cluster
    pytest.param(EYE4.repeat(2, 1), {"labels": torch.tensor([0] * 4 + [1] * 4)}, (0.0, 1.0, 0.0, 0.0),
                 id="labels-independent"),
    pytest.param(EYE4[[1, 1, 1, 1]], {"labels": torch.tensor([0, 1, 0, 1])}, (0.0, 1.0, 3.0, 0.0),
                 id="labels-collapsed"),
]


@pytest.mark.parametrize("probs, kwargs, expected", ROUTING_CASES)
def test_routing_metrics_exact_values(probs, kwargs, expected):
    got = routing_metrics(probs=probs, **kwargs)
    assert list(got) == list(ROUTING_METRIC_KEYS)
    assert all(isinstance(v, float) for v in got.values())
    assert [got[k] for k in ROUTING_METRIC_KEYS] == pytest.approx(list(expected), abs=1e-12)


def test_logits_give_the_same_metrics_as_their_softmax():
    logits = torch.randn(3, 5, 6, dtype=torch.float64)
    labels = torch.randint(0, 3, (3, 5))
    a = routing_metrics(logits, labels=labels, top_k=2)
    b = routing_metrics(probs=torch.softmax(logits, -1), labels=labels, top_k=2)
    assert a == pytest.approx(b, abs=1e-12)


def test_soft_specialization_with_labels_matches_hand_computation():
    # cluster 0 -> expert 0 with certainty, cluster 1 -> 50/50; equal cluster sizes
    probs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    h_c, h_x, h_cx = _h(0.5, 0.5), _h(0.75, 0.25), _h(0.5, 0.25, 0.25)
    expected_spec = (h_c + h_x - h_cx) / h_c
    expected_entropy = (0 + 0 + LN2 + LN2) / 4 / LN2
    got = routing_metrics(probs=probs, labels=labels)
    assert got["expert_specialization"] == pytest.approx(expected_spec, abs=1e-12)
    assert got["routing_entropy"] == pytest.approx(expected_entropy, abs=1e-12)
    # without labels: I(expert; token) = H(mean p) - mean H(p_t), over ln 2
    got = routing_metrics(probs=probs)
    assert got["expert_specialization"] == pytest.approx((h_x - 0.5 * LN2) / LN2, abs=1e-12)


def test_probs_are_renormalised_and_sparsity_threshold_is_relative_to_uniform():
    probs = torch.tensor([[2.0, 1.0, 0.04, 0.0]], dtype=torch.float64)  # sums to 3.04
    p = [2 / 3.04, 1 / 3.04, 0.04 / 3.04, 0.0]
    got = routing_metrics(probs=probs)
    assert got["routing_entropy"] == pytest.approx(_h(*p) / LN4, abs=1e-12)
    # 0.04/3.04 = 0.013 < 0.1/4 and 0 < 0.025: 2 of 3 near zero
    assert got["routing_sparsity"] == pytest.approx(2 / 3, abs=1e-12)
    # a threshold of 0.05 of the uniform share (0.0125) counts only the exact zero
    assert routing_metrics(probs=probs, sparsity_threshold=0.05)["routing_sparsity"] == pytest.approx(1 / 3)


def test_mask_leaves_padding_tokens_out():
    probs = torch.cat([EYE4, torch.full((3, 4), 0.25, dtype=torch.float64)])
    mask = torch.tensor([True] * 4 + [False] * 3)
    assert routing_metrics(probs=probs, mask=mask) == pytest.approx(routing_metrics(probs=EYE4), abs=1e-12)
    float_mask = mask.to(torch.float64)
    assert routing_metrics(probs=probs, mask=float_mask) == pytest.approx(routing_metrics(probs=EYE4), abs=1e-12)


def test_fully_masked_batch_gives_nan_so_the_decision_is_skipped():
    got = routing_metrics(probs=EYE4, mask=torch.zeros(4, dtype=torch.bool))
    assert all(math.isnan(v) for v in got.values())


def test_list_of_layers_averages_and_takes_worst_load():
    layers = [EYE4, EYE4[[0, 0, 0, 0]], torch.full((4, 4), 0.25, dtype=torch.float64)]
    per = [routing_metrics(probs=t) for t in layers]
    got = routing_metrics(probs=layers)
    for key in ("routing_entropy", "routing_sparsity", "expert_specialization"):
        assert got[key] == pytest.approx(sum(p[key] for p in per) / 3, abs=1e-12)
    assert got["load_violation"] == pytest.approx(max(p["load_violation"] for p in per))
    assert routing_metrics(probs=tuple(layers)) == got


def test_as_tensors_returns_zero_dim_tensors_with_the_same_values():
    logits = torch.randn(64, 8)
    labels = torch.randint(0, 4, (64,))
    floats = routing_metrics(logits, labels=labels, num_labels=4, top_k=2)
    tensors = routing_metrics(logits, labels=labels, num_labels=4, top_k=2, as_tensors=True)
    assert list(tensors) == list(ROUTING_METRIC_KEYS)
    for key, value in tensors.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and value.dtype == torch.float32
        assert value.item() == pytest.approx(floats[key], abs=1e-6)


def test_routing_metrics_do_not_track_gradients():
    logits = torch.randn(8, 4, requires_grad=True)
    out = routing_metrics(logits, as_tensors=True)
    assert not any(v.requires_grad for v in out.values())


def test_metrics_stay_in_range_on_random_inputs():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        e = int(torch.randint(2, 9, (1,), generator=gen))
        logits = torch.randn(32, e, generator=gen) * float(torch.rand(1, generator=gen) * 10)
        labels = torch.randint(0, 3, (32,), generator=gen)
        k = int(torch.randint(1, e + 1, (1,), generator=gen))
        got = routing_metrics(logits, top_k=k, labels=labels, num_labels=3)
        for key in ("routing_entropy", "routing_sparsity", "expert_specialization"):
            assert 0.0 <= got[key] <= 1.0, (key, got)
        assert 0.0 <= got["load_violation"] <= e / k - 1 + 1e-6


BAD_ROUTING = [
    ({}, ValueError, "exactly one of router_logits and probs"),
    ({"router_logits": torch.zeros(2, 4), "probs": torch.zeros(2, 4)}, ValueError, "exactly one"),
    ({"router_logits": [[0.1, 0.9]]}, TypeError, "router_logits[0] must be a torch.Tensor"),
    ({"router_logits": torch.zeros(3, 4, dtype=torch.long)}, TypeError, "floating-point"),
    ({"router_logits": torch.zeros(3, 1)}, ValueError, "at least 2 experts"),
    ({"router_logits": []}, ValueError, "must not be an empty list"),
    ({"router_logits": [torch.zeros(2, 4), torch.zeros(2, 3)]}, ValueError, "disagree on num_experts"),
    ({"router_logits": torch.zeros(3, 4), "top_k": 5}, ValueError, "top_k must be <= num_experts=4, got top_k=5"),
    ({"router_logits": torch.zeros(3, 4), "top_k": 0}, ValueError, "top_k must be >= 1, got top_k=0"),
    ({"router_logits": torch.zeros(3, 4), "top_k": 1.5}, TypeError, "top_k must be an int, got top_k=1.5"),
    ({"router_logits": torch.zeros(3, 4), "num_experts": 5}, ValueError, "num_experts must equal"),
    ({"router_logits": torch.zeros(3, 4), "labels": torch.zeros(4, dtype=torch.long)}, ValueError,
     "labels must have the leading shape of router_logits (3,), got labels of shape (4,)"),
    ({"router_logits": torch.zeros(3, 4), "labels": torch.zeros(3)}, TypeError, "labels must be an integer tensor"),
    ({"router_logits": torch.zeros(3, 4), "labels": [0, 1, 2]}, TypeError, "labels must be a torch.Tensor"),
    ({"router_logits": torch.zeros(3, 4), "mask": torch.ones(2, dtype=torch.bool)}, ValueError, "mask must have"),
    ({"router_logits": torch.zeros(3, 4), "sparsity_threshold": 0.0}, ValueError,
     "sparsity_threshold must be in (0, 1], got sparsity_threshold=0.0"),
    ({"router_logits": torch.zeros(3, 4), "as_tensors": 1}, TypeError, "as_tensors must be a bool"),
]


@pytest.mark.parametrize("kwargs, exc, message", BAD_ROUTING)
def test_routing_metrics_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        routing_metrics(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_routing_metrics_as_tensors_cause_no_host_sync_on_cuda():
    model = TinyMoE(16, 32, 4, num_experts=8, top_k=2).cuda()
    x = torch.randn(512, 16, device="cuda")
    labels = torch.randint(0, 4, (512,), device="cuda")
    mask = torch.rand(512, device="cuda") > 0.1
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, logits = model(x)
        got = routing_metrics(logits, top_k=2, labels=labels, num_labels=4, mask=mask, as_tensors=True)
        layered = routing_metrics([logits, logits], top_k=2, as_tensors=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(v.device.type == "cuda" for v in (*got.values(), *layered.values()))
    cpu = routing_metrics(logits.cpu(), top_k=2, labels=labels.cpu(), mask=mask.cpu())
    assert {k: v.item() for k, v in got.items()} == pytest.approx(cpu, abs=1e-5)


# --------------------------------------------------------------------------- moe_param_groups
def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_param_groups_of_tiny_moe_roles_counts_and_hparams(capsys):
    model = TinyMoE(8, 16, 4, num_experts=4, top_k=1)
    groups = moe_param_groups(model, lr=1e-3, weight_decay=0.1, gate_lr=1e-4)
    assert capsys.readouterr().out.splitlines() == [
        "num gate parameter tensors: 1, with 32 parameters",
        "num gate_no_decay parameter tensors: 1, with 4 parameters",
        "num expert parameter tensors: 8, with 768 parameters",
        "num expert_no_decay parameter tensors: 8, with 80 parameters",
        "num shared_no_decay parameter tensors: 2, with 16 parameters",
    ]
    table = [(g["name"], g["role"], len(g["params"]), g["lr"], g["weight_decay"]) for g in groups]
    assert table == [
        ("gate", "gate", 1, 1e-4, 0.1),
        ("gate_no_decay", "gate", 1, 1e-4, 0.0),
        ("expert", "expert", 8, 1e-3, 0.1),
        ("expert_no_decay", "expert", 8, 1e-3, 0.0),
        ("shared_no_decay", "shared", 2, 1e-3, 0.0),
    ]
    assert _by_name(groups)["gate"]["params"][0] is model.gate.weight
    # every parameter exactly once
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    torch.optim.AdamW(groups)  # a valid optimizer spec


class _Block(nn.Module):
    """Transformer-ish block with Qwen/DeepSeek-style naming (experts have their own gate_proj)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.ln_1 = nn.LayerNorm(4)
        self.router = nn.Linear(4, 2, bias=False)
        self.experts = nn.ModuleList(nn.ModuleDict({"gate_proj": nn.Linear(4, 6), "down_proj": nn.Linear(6, 4)})
                                     for _ in range(2))
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_expert_patterns_win_tied_once_frozen_left_out(capsys):
    model = _Block()
    groups = moe_param_groups(model, no_decay_patterns=(r"bias$", "norm", r"^ln_"), verbose=True)
    out = capsys.readouterr().out.splitlines()
    names = {g["name"]: sorted(n for n, p in model.named_parameters() if any(p is q for q in g["params"]))
             for g in groups}
    assert names == {
        "gate": ["router.weight"],
        "expert": ["experts.0.down_proj.weight", "experts.0.gate_proj.weight",
                   "experts.1.down_proj.weight", "experts.1.gate_proj.weight"],
        "expert_no_decay": ["experts.0.down_proj.bias", "experts.0.gate_proj.bias",
                            "experts.1.down_proj.bias", "experts.1.gate_proj.bias"],
        "shared": ["embed.weight"],
        "shared_no_decay": ["ln_1.bias", "ln_1.weight"],
    }
    assert out[-1] == "left out: 1 tied/shared aliases (placed once), 2 frozen tensors"
    assert "num shared parameter tensors: 1, with 40 parameters" in out


def test_param_groups_regex_patterns_and_quiet(capsys):
    model = _Block()
    groups = moe_param_groups(model, gate_patterns=re.compile(r"^router\."), expert_patterns=r"experts\.\d+\.",
                              no_decay_patterns=(), verbose=False)
    assert capsys.readouterr().out == ""
    assert [g["name"] for g in groups] == ["gate", "expert", "shared"]
    assert all(g["weight_decay"] == 0.01 for g in groups)


def test_param_groups_without_gate():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"no parameter name of Sequential matches gate_patterns=\('gate', 'router'\).*0\.weight"):
        moe_param_groups(model, verbose=False)
    groups = moe_param_groups(model, require_gate=False, verbose=False)
    assert [(g["name"], len(g["params"])) for g in groups] == [("shared", 2), ("shared_no_decay", 2)]


BAD_GROUPS = [
    ({"gate_patterns": ("gate", "")}, ValueError, "gate_patterns must not contain an empty pattern"),
    ({"expert_patterns": ("expert[",)}, ValueError, "expert_patterns has an invalid regular expression 'expert['"),
    ({"no_decay_patterns": 3}, TypeError, "no_decay_patterns must be a str, a compiled regex or a list/tuple"),
    ({"gate_patterns": ("gate", 1)}, TypeError, "gate_patterns entries must be str or compiled regex"),
    ({"lr": -1e-3}, ValueError, "lr must be in [0, inf), got lr=-0.001"),
    ({"lr": float("nan")}, ValueError, "lr must not be NaN"),
    ({"weight_decay": float("inf")}, ValueError, "weight_decay must be in [0, inf), got weight_decay=inf"),
    ({"gate_lr": "1e-3"}, TypeError, "gate_lr must be a real number, got gate_lr='1e-3'"),
    ({"expert_lr": -1.0}, ValueError, "expert_lr must be in [0, inf)"),
    ({"require_gate": "yes"}, TypeError, "require_gate must be a bool"),
]


@pytest.mark.parametrize("kwargs, exc, message", BAD_GROUPS)
def test_param_groups_bad_arguments(kwargs, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        moe_param_groups(TinyMoE(4, 4, 2, 2, 1), verbose=False, **kwargs)


def test_param_groups_bad_model():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        moe_param_groups([nn.Parameter(torch.zeros(2))])
    with pytest.raises(ValueError, match="model has no parameters"):
        moe_param_groups(nn.ReLU())


# --------------------------------------------------------------------------- TinyMoE
def test_tiny_moe_forward_is_top_k_weighted_sum_of_experts():
    torch.manual_seed(0)
    model = TinyMoE(6, 8, 3, num_experts=4, top_k=2)
    x = torch.randn(2, 5, 6)
    out, logits = model(x)
    assert out.shape == (2, 5, 3) and logits.shape == (2, 5, 4)
    h = model.norm(x.reshape(-1, 6))
    probs = torch.softmax(model.gate(h), -1)
    expected = torch.zeros(10, 3)
    for t in range(10):
        for e in probs[t].topk(2).indices.tolist():
            expected[t] += probs[t, e] * model.experts[e](h[t])
    torch.testing.assert_close(out.reshape(10, 3), expected)
    torch.testing.assert_close(logits.reshape(10, 4), model.gate(h))


def test_tiny_moe_top1_router_gets_gradient():
    model = TinyMoE(4, 8, 2, num_experts=3, top_k=1)
    out, _ = model(torch.randn(16, 4))
    out.pow(2).sum().backward()
    assert model.gate.weight.grad is not None and model.gate.weight.grad.abs().sum() > 0


def test_tiny_moe_add_expert():
    torch.manual_seed(0)
    model = TinyMoE(4, 8, 2, num_experts=3, top_k=1)
    x = torch.randn(16, 4)
    before, logits_before = model(x)
    new = model.add_expert()
    assert model.num_experts == 4 and len(new["expert"]) == 4 and new["gate"][0].shape == (4,)
    out, logits = model(x)
    assert logits.shape == (16, 4)
    torch.testing.assert_close(logits[:, :3], logits_before)
    assert torch.equal(logits[:, 3], torch.zeros(16))
    names = {n for n, _ in model.named_parameters()}
    assert {"gate_extra.0", "experts.3.fc1.weight"} <= names
    roles = {g["name"]: g for g in moe_param_groups(model, verbose=False)}
    assert any(p is new["gate"][0] for p in roles["gate"]["params"])


@pytest.mark.parametrize(
    "args, exc, message",
    [
        ((4, 8, 2, 1, 1), ValueError, "num_experts must be >= 2, got num_experts=1"),
        ((4, 8, 2, 3, 4), ValueError, "top_k must be <= num_experts=3, got top_k=4"),
        ((4, 0, 2, 3, 1), ValueError, "hidden must be >= 1, got hidden=0"),
        ((4.0, 8, 2, 3, 1), TypeError, "in_dim must be an int, got in_dim=4.0"),
    ],
)
def test_tiny_moe_bad_arguments(args, exc, message):
    with pytest.raises(exc, match=re.escape(message)):
        TinyMoE(*args)
