"""DistributedOptimizerWrapper: every DDP rank applies the same decisions.

Three levels: the single-process fallback (no process group), two real gloo processes on
127.0.0.1 (torch.distributed, no Ray) for the protocol's details, and Ray Train's
``TorchTrainer`` with two workers on the session's local Ray.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import socket
import sys
import traceback
from datetime import timedelta

import pytest
import torch

from ray_metaopt import AdaptiveFrequency, HParamUpdate, MetaOptimizer, OptimizerWrapper
from ray_metaopt.distributed import DistributedOptimizerWrapper, _mean_metrics


# --------------------------------------------------------------------------- strategies
class SeededJitter(MetaOptimizer):
    """Sets each group's lr to ``initial_lr`` times a pseudo-random factor from its own seed.

    Built with ``seed=rank``, ranks that decided on their own would pick different lrs at every
    decision; with the distributed wrapper only the deciding rank's draws may show.
    """

    _state_attrs = ("state", "seen")
    FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)

    def __init__(self, seed: int, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.reset()

    def _init_state(self):
        self.state = 12345 + 1000003 * self.seed
        self.seen = []

    def decide(self, metrics, step, groups):
        self.seen.append(metrics["loss"])
        updates = []
        for g in groups:
            self.state = (1103515245 * self.state + 12345) % 2**31
            factor = self.FACTORS[(self.state >> 16) % len(self.FACTORS)]
            updates.append(HParamUpdate(g.index, "lr", g.initial_lr * factor, f"jitter x{factor}"))
            if g.weight_decay is not None:
                updates.append(HParamUpdate(g.index, "weight_decay", 1e-4 * (1 + self.state % 7), "jitter"))
        return updates


class Halve(MetaOptimizer):
    """Halves every lr at each decision and records the metrics it saw."""

    _state_attrs = ("seen",)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.reset()

    def _init_state(self):
        self.seen = []

    def decide(self, metrics, step, groups):
        self.seen.append(dict(metrics))
        return [HParamUpdate(g.index, "lr", g.lr / 2, "halve") for g in groups]


def _model_and_groups(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    groups = [
        {"params": model[0].parameters(), "lr": 0.05, "name": "body"},
        {"params": model[2].parameters(), "lr": 0.01, "name": "head", "weight_decay": 1e-4},
    ]
    return model, groups


def _lrs(opt) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


# --------------------------------------------------------------------------- single process
def test_without_process_group_behaves_like_plain_wrapper():
    # Halve every 3rd step (decisions at steps 2, 5, 8): expected lr of group 0 after each step.
    expected = [0.05, 0.05, 0.025, 0.025, 0.025, 0.0125, 0.0125, 0.0125, 0.00625, 0.00625]
    model, groups = _model_and_groups(0)
    opt = DistributedOptimizerWrapper(torch.optim.SGD(groups), Halve(update_frequency=3))
    assert not opt.is_distributed and opt.is_decision_rank and opt.rank == 0
    seen = []
    for step in range(10):
        opt.update_hyperparameters({"loss": torch.tensor(1.0 / (step + 1))})
        seen.append(_lrs(opt)[0])
    assert seen == pytest.approx(expected, rel=0, abs=1e-15)
    assert [d.step for d in opt.decisions if d.group == 0] == [2, 5, 8]

    model, groups = _model_and_groups(0)
    plain = OptimizerWrapper(torch.optim.SGD(groups), Halve(update_frequency=3))
    for step in range(10):
        plain.update_hyperparameters({"loss": torch.tensor(1.0 / (step + 1))})
    assert plain.state_dict()["meta_wrapper"] == opt.state_dict()["meta_wrapper"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"decision_rank": -1}, ValueError, "decision_rank must be >= 0, got decision_rank=-1"),
        ({"decision_rank": 0.5}, TypeError, "decision_rank must be an int, got decision_rank=0.5"),
        ({"sync_state": "yes"}, TypeError, "sync_state must be a bool, got sync_state='yes'"),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    _, groups = _model_and_groups(0)
    with pytest.raises(error, match=match):
        DistributedOptimizerWrapper(torch.optim.SGD(groups), Halve(), **kwargs)


@pytest.mark.parametrize(
    "gathered, expected",
    [
        ([(0, {"loss": 1.0}), (0, {"loss": 3.0})], {"loss": 2.0}),
        # a metric only some ranks report is averaged over those ranks
        ([(0, {"loss": 1.0, "grad_norm": 4.0}), (0, {"loss": 2.0})], {"loss": 1.5, "grad_norm": 4.0}),
        ([(0, {"loss": 1.0}), (0, {"loss": math.inf}), (0, {"loss": -math.inf})], {"loss": math.nan}),
        ([(0, {"loss": 0.1}), (0, {"loss": 0.2}), (0, {"loss": 0.3})], {"loss": math.fsum([0.1, 0.2, 0.3]) / 3}),
    ],
)
def test_mean_metrics(gathered, expected):
    got = _mean_metrics(gathered)
    assert list(got) == list(expected)
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key])
        else:
            assert got[key] == value


# --------------------------------------------------------------------------- two gloo processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _CollectiveSpy:
    """Counts calls of torch.distributed collectives (then calls the real ones)."""

    NAMES = ("all_gather_object", "broadcast_object_list", "all_reduce", "broadcast", "all_gather", "barrier")

    def __init__(self, dist):
        self.count = 0
        self.dist = dist
        self.originals = {name: getattr(dist, name) for name in self.NAMES}
        for name, fn in self.originals.items():
            setattr(dist, name, self._wrap(fn))

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            self.count += 1
            return fn(*args, **kwargs)

        return counted

    def restore(self):
        for name, fn in self.originals.items():
            setattr(self.dist, name, fn)


def _scenario_agree(rank: int, wrapper_cls) -> dict:
    """Train 40 steps on this rank's own data with a rank-seeded strategy; record lrs per step."""
    import torch.distributed as dist

    model, groups = _model_and_groups(rank)
    base = torch.optim.SGD(groups, lr=0.05)
    meta = SeededJitter(
        seed=rank,
        update_frequency=3,
        adaptive_frequency=AdaptiveFrequency(min_interval=1, max_interval=6, fast_change=0.05, slow_change=0.01),
    )
    opt = wrapper_cls(base, meta)
    sched = opt.attach_scheduler(torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9))
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(64, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True) * (1 + rank)
    spy = _CollectiveSpy(dist) if wrapper_cls is DistributedOptimizerWrapper else None
    trace, decision_steps, comm = [], [], []
    try:
        for step in range(40):
            before = spy.count if spy else 0
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            decisions = opt.update_hyperparameters({"loss": loss.detach()}, step)
            comm.append((spy.count if spy else 0) - before)
            if decisions:
                decision_steps.append(step)
            opt.step()
            sched.step()
            trace.append(_lrs(opt) + [float(opt.param_groups[1]["weight_decay"])])
    finally:
        if spy:
            spy.restore()
    return {
        "trace": trace,
        "decision_steps": decision_steps,
        "comm": comm,
        "log": [d.to_dict() for d in opt.decisions],
        "base_lrs": list(sched.base_lrs),
        "next_update_step": meta.next_update_step,
    }


def _scenario_mean_and_sync_state(rank: int) -> dict:
    """Rank r reports loss = 10 r + step; with sync_state both ranks hold the decider's state."""
    _, groups = _model_and_groups(0)
    opt = DistributedOptimizerWrapper(torch.optim.SGD(groups), Halve(update_frequency=4), sync_state=True)
    for step in range(8):
        opt.update_hyperparameters({"loss": 10.0 * rank + step, "only_rank1": 1.0} if rank else {"loss": float(step)})
    return {"seen": opt.meta_optimizer.seen, "state": opt.meta_optimizer.state_dict()}


def _scenario_nonfinite(rank: int) -> dict:
    """Rank 1's loss is NaN at the first decision step: every rank skips it and retries next step."""
    _, groups = _model_and_groups(0)
    opt = DistributedOptimizerWrapper(torch.optim.SGD(groups), Halve(update_frequency=2))
    rows = []
    for step in range(5):
        loss = math.nan if (rank == 1 and step == 1) else 1.0
        decisions = opt.update_hyperparameters({"loss": loss}, step)
        rows.append((step, len(decisions), _lrs(opt)[0]))
    return {"rows": rows, "skipped": [s.to_dict() for s in opt.log.skipped]}


def _scenario_step_mismatch(rank: int) -> dict:
    _, groups = _model_and_groups(0)
    opt = DistributedOptimizerWrapper(torch.optim.SGD(groups), Halve(update_frequency=1))
    try:
        opt.update_hyperparameters({"loss": 1.0}, step=3 + rank)
    except RuntimeError as err:
        return {"error": str(err)}
    return {"error": None}


def _scenario_decision_rank_1(rank: int) -> dict:
    """decision_rank=1: rank 1's draws (seed 1) drive both ranks."""
    _, groups = _model_and_groups(0)
    opt = DistributedOptimizerWrapper(torch.optim.SGD(groups), SeededJitter(seed=rank), decision_rank=1)
    trace = []
    for step in range(4):
        opt.update_hyperparameters({"loss": 1.0 + step}, step)
        trace.append(_lrs(opt))
    return {"trace": trace, "is_decision_rank": opt.is_decision_rank}


def _gloo_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
        result = {
            "agree": _scenario_agree(rank, DistributedOptimizerWrapper),
            "independent": _scenario_agree(rank, OptimizerWrapper),
            "mean": _scenario_mean_and_sync_state(rank),
            "nonfinite": _scenario_nonfinite(rank),
            "mismatch": _scenario_step_mismatch(rank),
            "rank1": _scenario_decision_rank_1(rank),
        }
        dist.destroy_process_group()
    except BaseException:
        result = {"exception": traceback.format_exc()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    """Run every two-process scenario once (one spawn for the module: torch imports are slow)."""
    out = tmp_path_factory.mktemp("gloo")
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_gloo_worker, args=(r, 2, port, str(out))) for r in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    results = []
    for r in range(2):
        path = out / f"rank{r}.json"
        assert path.exists(), f"rank {r} wrote no result (exit code {procs[r].exitcode})"
        data = json.loads(path.read_text())
        assert "exception" not in data, data.get("exception")
        results.append(data)
    return results


@pytest.mark.slow
def test_ranks_agree_on_every_lr_at_every_step(gloo_results):
    r0, r1 = gloo_results[0]["agree"], gloo_results[1]["agree"]
    assert len(r0["trace"]) == 40
    assert r0["trace"] == r1["trace"]  # exact equality, both groups, lr and weight decay
    assert r0["log"] == r1["log"]
    assert r0["decision_steps"] == r1["decision_steps"]
    assert r0["base_lrs"] == r1["base_lrs"]
    assert r0["next_update_step"] == r1["next_update_step"]
    # the strategy really changed lrs often, on both groups
    assert len(r0["decision_steps"]) >= 8
    assert len({row[0] for row in r0["trace"]}) >= 4 and len({row[1] for row in r0["trace"]}) >= 4
    # the adaptive schedule (driven by the mean loss) moved away from every-3rd-step
    gaps = {b - a for a, b in zip(r0["decision_steps"], r0["decision_steps"][1:])}
    assert gaps != {3}


@pytest.mark.slow
def test_without_sync_the_same_setup_diverges(gloo_results):
    # Control for the test above: plain wrappers on each rank pick different lrs.
    r0, r1 = gloo_results[0]["independent"], gloo_results[1]["independent"]
    differing = sum(a != b for a, b in zip(r0["trace"], r1["trace"]))
    assert differing >= 10


@pytest.mark.slow
def test_only_decision_steps_communicate(gloo_results):
    for rank in range(2):
        r = gloo_results[rank]["agree"]
        decided = set(r["decision_steps"])
        due = [step for step, n in enumerate(r["comm"]) if n]
        # two collectives (gather metrics, broadcast outcome) exactly at decision steps
        assert set(due) == decided
        assert all(r["comm"][s] == 2 for s in due)
        assert sum(r["comm"]) == 2 * len(decided)


@pytest.mark.slow
def test_decider_sees_mean_over_ranks_and_sync_state(gloo_results):
    # Decisions at steps 3 and 7: rank 0 reports loss=step, rank 1 reports 10+step.
    expected = [{"loss": 8.0, "only_rank1": 1.0}, {"loss": 12.0, "only_rank1": 1.0}]
    r0, r1 = gloo_results[0]["mean"], gloo_results[1]["mean"]
    assert r0["seen"] == expected
    assert r1["seen"] == expected  # loaded from the decider (sync_state=True)
    assert r0["state"] == r1["state"]


@pytest.mark.slow
def test_non_finite_metric_on_one_rank_skips_on_all(gloo_results):
    # update_frequency=2: step 1 is due but rank 1's NaN makes the mean NaN -> skipped on both
    # ranks; step 2 is due again and halves; next due step 4 halves again.
    expected_rows = [[0, 0, 0.05], [1, 0, 0.05], [2, 2, 0.025], [3, 0, 0.025], [4, 2, 0.0125]]
    for rank in range(2):
        r = gloo_results[rank]["nonfinite"]
        assert r["rows"] == expected_rows
        assert [s["step"] for s in r["skipped"]] == [1]
        assert "non-finite metric loss=nan" in r["skipped"][0]["reason"]


@pytest.mark.slow
def test_ranks_at_different_steps_raise_on_every_rank(gloo_results):
    for rank in range(2):
        err = gloo_results[rank]["mismatch"]["error"]
        assert err is not None and "different steps [3, 4]" in err


@pytest.mark.slow
def test_decision_rank_other_than_zero(gloo_results):
    r0, r1 = gloo_results[0]["rank1"], gloo_results[1]["rank1"]
    assert r0["trace"] == r1["trace"]
    assert (r0["is_decision_rank"], r1["is_decision_rank"]) == (False, True)
    # what a single process with seed=1 would pick (rank 1 decided)
    _, groups = _model_and_groups(0)
    alone = OptimizerWrapper(torch.optim.SGD(groups), SeededJitter(seed=1))
    expected = []
    for step in range(4):
        alone.update_hyperparameters({"loss": 1.0 + step}, step)
        expected.append(_lrs(alone))
    assert r1["trace"] == expected


# --------------------------------------------------------------------------- Ray Train
def _ray_train_loop(config):
    """Ray Train worker: DDP over gloo, rank-seeded strategy, lr trace written per rank."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(0)  # same initial weights on every rank (DDP broadcasts them anyway)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    model = ray.train.torch.prepare_model(net)
    params = list(model.parameters())
    base = torch.optim.AdamW(
        [{"params": params[:2], "lr": 1e-2, "name": "body"}, {"params": params[2:], "lr": 3e-3, "name": "head"}]
    )
    opt = DistributedOptimizerWrapper(base, SeededJitter(seed=rank, update_frequency=2))
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(32, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True)
    trace = []
    for step in range(config["steps"]):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.update_hyperparameters({"loss": loss.detach()}, step)
        opt.step()
        trace.append([float(g["lr"]) for g in opt.param_groups])
    with open(os.path.join(config["out_dir"], f"rank{rank}.json"), "w") as f:
        json.dump({"trace": trace, "decisions": len(opt.decisions), "world": ctx.get_world_size()}, f)


@pytest.mark.ray
@pytest.mark.slow
def test_torch_trainer_ranks_agree(ray_session, tmp_path):
    from ray import cloudpickle

    # Pytest imports this file as a top-level module that Ray workers cannot import: ship the
    # strategy and the loop by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        _fit_and_check_torch_trainer(tmp_path)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _fit_and_check_torch_trainer(tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tmp_path / "traces"
    out.mkdir()
    steps = 20
    trainer = TorchTrainer(
        _ray_train_loop,
        train_loop_config={"steps": steps, "out_dir": str(out)},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name="ddp_agree", storage_path=str(tmp_path / "storage")),
    )
    result = trainer.fit()
    assert result.error is None
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert len(ranks[0]["trace"]) == steps
    assert ranks[0]["trace"] == ranks[1]["trace"]
    assert ranks[0]["decisions"] == ranks[1]["decisions"] >= 10
    assert len({row[0] for row in ranks[0]["trace"]}) >= 3  # lr really moved
