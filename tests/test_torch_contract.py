"""torch's optimizer hook contract, held by the wrapper (issue 17, items 1-2).

The installed torch ships no test suite, so these follow torch's own hook tests in
test/test_optim.py (test_step_pre_hook/post_hook, test_step_all_hooks, test_state_dict_pre_hook,
test_state_dict_post_hook, test_load_state_dict_pre_hook_and_prepend,
test_load_state_dict_post_hook) and run each one on the plain optimizer and on the wrapped one:
the wrapper must behave exactly as the plain optimizer does, with the wrapper passed to hooks.
"""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from core_strategies import ScaleEvery
from ray_metaopt import OptimizerWrapper

OPTIMIZERS = [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    (torch.optim.Adam, {"lr": 1e-3}),
    (torch.optim.AdamW, {"lr": 1e-3}),
    (torch.optim.RMSprop, {"lr": 1e-3}),
    (torch.optim.Adagrad, {"lr": 1e-2}),
]


def build(kind, opt_cls, kwargs):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(3))
    opt = opt_cls([p], **kwargs)
    if kind == "wrapped":
        opt = OptimizerWrapper(opt, ScaleEvery(update_frequency=1000))
    return p, opt


def one_step(p, opt):
    opt.zero_grad()
    p.pow(2).sum().backward()
    opt.step()


params = pytest.mark.parametrize("opt_cls, kwargs", OPTIMIZERS, ids=[c.__name__ for c, _ in OPTIMIZERS])
kinds = pytest.mark.parametrize("kind", ["plain", "wrapped"])


@params
@kinds
def test_step_pre_and_post_hook(kind, opt_cls, kwargs):
    p, opt = build(kind, opt_cls, kwargs)
    data = 2
    seen = []

    def pre(optimizer, args, kwargs_):
        nonlocal data
        data += 2
        seen.append(optimizer)

    def post(optimizer, args, kwargs_):
        nonlocal data
        data *= 3
        seen.append(optimizer)

    hpre = opt.register_step_pre_hook(pre)
    hpost = opt.register_step_post_hook(post)
    one_step(p, opt)
    assert data == 12 and seen == [opt, opt]
    hpre.remove()
    hpost.remove()
    one_step(p, opt)
    assert data == 12


@params
@kinds
def test_step_all_hooks_run_in_torchs_order_with_the_stepped_optimizer(kind, opt_cls, kwargs):
    # torch: global pre, local pre, step, local post, global post, each called with the optimizer.
    p, opt = build(kind, opt_cls, kwargs)
    data = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: data.append(("global pre", o))),
        opt.register_step_pre_hook(lambda o, a, k: data.append(("local pre", o))),
        opt.register_step_post_hook(lambda o, a, k: data.append(("local post", o))),
        register_optimizer_step_post_hook(lambda o, a, k: data.append(("global post", o))),
    ]
    try:
        one_step(p, opt)
    finally:
        for h in handles:
            h.remove()
    assert [name for name, _ in data] == ["global pre", "local pre", "local post", "global post"]
    assert all(o is opt for _, o in data)


@params
def test_hooks_on_the_inner_optimizer_still_run_once(opt_cls, kwargs):
    p, w = build("wrapped", opt_cls, kwargs)
    calls = []
    w.optimizer.register_step_pre_hook(lambda o, a, k: calls.append(("inner pre", o)))
    w.optimizer.register_step_post_hook(lambda o, a, k: calls.append(("inner post", o)))
    w.register_step_pre_hook(lambda o, a, k: calls.append(("outer pre", o)))
    one_step(p, w)
    assert calls == [("outer pre", w), ("inner pre", w.optimizer), ("inner post", w.optimizer)]


@kinds
def test_step_pre_hook_may_replace_the_closure(kind):
    p, opt = build(kind, torch.optim.SGD, {"lr": 0.1})
    used = []

    def closure():
        used.append("replacement")
        opt.zero_grad()
        loss = p.pow(2).sum()
        loss.backward()
        return loss

    opt.register_step_pre_hook(lambda o, args, kw: (args, {"closure": closure}))
    opt.zero_grad()
    p.pow(2).sum().backward()
    opt.step()
    assert used == ["replacement"]


@params
@kinds
def test_state_dict_pre_hook(kind, opt_cls, kwargs):
    p, opt = build(kind, opt_cls, kwargs)
    one_step(p, opt)

    def pre(optimizer):
        optimizer.state["test"] = 1

    opt.register_state_dict_pre_hook(pre)
    assert opt.state_dict()["state"]["test"] == 1


@params
@kinds
def test_state_dict_post_hook_may_replace_the_state_dict(kind, opt_cls, kwargs):
    p, opt = build(kind, opt_cls, kwargs)
    one_step(p, opt)
    seen = []

    def post(optimizer, state_dict):
        seen.append(optimizer)
        state_dict["ran_state_dict_pre_hook"] = True
        return {**state_dict, "x": 1}

    opt.register_state_dict_post_hook(post)
    sd = opt.state_dict()
    assert sd["x"] == 1 and sd["ran_state_dict_pre_hook"] and seen == [opt]


@params
@kinds
def test_load_state_dict_pre_hook_and_prepend(kind, opt_cls, kwargs):
    p, opt = build(kind, opt_cls, kwargs)
    one_step(p, opt)
    sd = opt.state_dict()
    order, seen = [], []

    def pre1(optimizer, state_dict):
        order.append(1)
        state_dict["param_groups"][0]["lr"] = 0.002
        return state_dict

    def pre2(optimizer, state_dict):
        order.append(2)
        seen.append(optimizer)

    p2, opt2 = build(kind, opt_cls, kwargs)
    opt2.register_load_state_dict_pre_hook(pre1)
    opt2.register_load_state_dict_pre_hook(pre2, prepend=True)
    opt2.load_state_dict(sd)
    assert order == [2, 1] and seen == [opt2]
    assert opt2.param_groups[0]["lr"] == 0.002


@params
@kinds
def test_load_state_dict_post_hook(kind, opt_cls, kwargs):
    p, opt = build(kind, opt_cls, kwargs)
    one_step(p, opt)
    sd = opt.state_dict()
    seen = []

    def post(optimizer):
        seen.append(optimizer)
        optimizer.state["ran_load_state_dict_post_hook"] = True

    p2, opt2 = build(kind, opt_cls, kwargs)
    opt2.register_load_state_dict_post_hook(post)
    opt2.load_state_dict(sd)
    assert seen == [opt2] and opt2.state["ran_load_state_dict_post_hook"]


def test_hooks_survive_a_wrapped_round_trip_and_the_repro():
    p, w = build("wrapped", torch.optim.Adam, {"lr": 1e-3})
    w.register_state_dict_post_hook(lambda o, sd: {**sd, "x": 1})
    assert "x" in w.state_dict()  # the repro: False before
