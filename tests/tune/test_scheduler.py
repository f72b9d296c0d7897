"""MetaAwareScheduler: the stopping rules (table-driven), delegation to the wrapped scheduler,
save/restore, and real Tune runs under FIFO and ASHA where a diverging trial is stopped early."""

from __future__ import annotations

import inspect
import math
import sys

import pytest
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from ray_metaopt import HParamUpdate, MetaOptimizer, OptimizerWrapper
from ray_metaopt.tune.scheduler import MetaAwareScheduler

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


class _Trial:
    """The one attribute schedulers read from a trial in these unit tests."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id
        self.config = {}


# --------------------------------------------------------------------------- the rules, table-driven
# Each row: scheduler kwargs, a sequence of results, and the expected decision after each one.
F, T = False, True
RULE_CASES = [
    pytest.param(
        {},
        [{"val_loss": 1.0}, {"val_loss": 0.9}, {"val_loss": 0.95}],
        [CONTINUE, CONTINUE, CONTINUE],
        id="healthy",
    ),
    pytest.param(
        {},
        [{"val_loss": 1.0, "diverged": F}, {"val_loss": 2.0, "diverged": T}],
        [CONTINUE, STOP],
        id="diverged-flag",
    ),
    pytest.param(
        {},
        [{"train_loss": 1.0}, {"train_loss": float("nan")}],
        [CONTINUE, STOP],
        id="nan-train-loss",
    ),
    pytest.param(
        {},
        [{"val_loss": 1.0}, {"val_loss": float("inf")}],
        [CONTINUE, STOP],
        id="inf-val-loss",
    ),
    pytest.param(
        {"stop_on_divergence": False},
        [{"val_loss": 1.0}, {"val_loss": float("inf"), "diverged": T}],
        [CONTINUE, CONTINUE],
        id="divergence-rule-off",
    ),
    pytest.param(
        {"divergence_factor": 3.0},
        [{"val_loss": 1.0}, {"val_loss": 0.5}, {"val_loss": 1.4}, {"val_loss": 1.6}],
        [CONTINUE, CONTINUE, CONTINUE, STOP],  # 1.6 > 3 * 0.5
        id="divergence-factor",
    ),
    pytest.param(
        {"lr_floor_patience": 3},
        [
            {"val_loss": 1.0, "lr_at_floor": F},
            {"val_loss": 0.9, "lr_at_floor": T},  # improved: streak stays 0
            {"val_loss": 0.9, "lr_at_floor": T},  # 1
            {"val_loss": 0.95, "lr_at_floor": T},  # 2
            {"val_loss": 0.91, "lr_at_floor": T},  # 3 -> stop
        ],
        [CONTINUE, CONTINUE, CONTINUE, CONTINUE, STOP],
        id="lr-floor-patience",
    ),
    pytest.param(
        {"lr_floor_patience": 2},
        [
            {"val_loss": 1.0, "lr_at_floor": T},  # first value is an improvement over nothing
            {"val_loss": 1.0, "lr_at_floor": T},  # 1
            {"val_loss": 0.8, "lr_at_floor": T},  # improved -> 0
            {"val_loss": 0.9, "lr_at_floor": F},  # off the floor -> 0
            {"val_loss": 0.9, "lr_at_floor": T},  # 1
            {"val_loss": 0.9, "lr_at_floor": T},  # 2 -> stop
        ],
        [CONTINUE, CONTINUE, CONTINUE, CONTINUE, CONTINUE, STOP],
        id="lr-floor-streak-resets",
    ),
    pytest.param(
        {"lr_floor_patience": 2, "min_delta": 0.05},
        [
            {"val_loss": 1.0, "lr_at_floor": T},
            {"val_loss": 0.97, "lr_at_floor": T},  # better, but by less than min_delta: 1
            {"val_loss": 0.96, "lr_at_floor": T},  # 2 -> stop
        ],
        [CONTINUE, CONTINUE, STOP],
        id="lr-floor-min-delta",
    ),
    pytest.param(
        {"lr_floor_patience": None},
        [{"val_loss": 1.0, "lr_at_floor": T}] * 5,
        [CONTINUE] * 5,
        id="lr-floor-rule-off",
    ),
    pytest.param(
        {"stop_on_lr_floor_patience": 1, "metric": "score"},
        [{"score": 2.0, "lr_at_floor": T}, {"score": 2.0, "lr_at_floor": T}],
        [CONTINUE, STOP],
        id="alias-and-custom-metric",
    ),
]


@pytest.mark.parametrize("kwargs, results, expected", RULE_CASES)
def test_rules_decide_per_result(kwargs, results, expected):
    scheduler = MetaAwareScheduler(FIFOScheduler(), **kwargs)
    trial = _Trial("t0")
    scheduler.on_trial_add(None, trial)
    decisions = [scheduler.on_trial_result(None, trial, r) for r in results]
    assert decisions == expected
    if STOP in expected:
        assert "t0" in scheduler.stopped_trials
        assert scheduler.stopped_trials["t0"].split(":")[0] in ("diverged", "lr_floor")
        # Once stopped, a late (buffered) result cannot resurrect it.
        assert scheduler.on_trial_result(None, trial, {"val_loss": 0.1}) == STOP
    else:
        assert scheduler.stopped_trials == {}


def test_trials_are_tracked_independently():
    scheduler = MetaAwareScheduler(lr_floor_patience=2)
    a, b = _Trial("a"), _Trial("b")
    for t in (a, b):
        scheduler.on_trial_add(None, t)
    seq_a = [{"val_loss": 1.0, "lr_at_floor": True}] * 3
    seq_b = [{"val_loss": 1.0 - 0.1 * i, "lr_at_floor": True} for i in range(3)]
    got = [
        (scheduler.on_trial_result(None, a, ra), scheduler.on_trial_result(None, b, rb))
        for ra, rb in zip(seq_a, seq_b)
    ]
    assert got == [(CONTINUE, CONTINUE), (CONTINUE, CONTINUE), (STOP, CONTINUE)]
    assert set(scheduler.stopped_trials) == {"a"}


# --------------------------------------------------------------------------- delegation
class _Recording(TrialScheduler):
    """A complete scheduler that records every call it gets."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.results = []

    def set_search_properties(self, metric, mode, **spec):
        self.calls.append(("set_search_properties", metric, mode, tuple(sorted(spec))))
        self._metric = metric
        return True

    def on_trial_add(self, tc, trial):
        self.calls.append(("on_trial_add", trial.trial_id))

    def on_trial_error(self, tc, trial):
        self.calls.append(("on_trial_error", trial.trial_id))

    def on_trial_result(self, tc, trial, result):
        self.calls.append(("on_trial_result", trial.trial_id))
        self.results.append(result)
        return TrialScheduler.PAUSE

    def on_trial_complete(self, tc, trial, result):
        self.calls.append(("on_trial_complete", trial.trial_id))
        self.results.append(result)

    def on_trial_remove(self, tc, trial):
        self.calls.append(("on_trial_remove", trial.trial_id))

    def choose_trial_to_run(self, tc):
        self.calls.append(("choose_trial_to_run",))
        return "chosen"

    def debug_string(self):
        return "recording"

    def save(self, path):
        self.calls.append(("save",))
        with open(path, "w") as f:
            f.write("base-state")

    def restore(self, path):
        with open(path) as f:
            self.calls.append(("restore", f.read()))


def _trial_scheduler_interface():
    names = []
    for name, member in vars(TrialScheduler).items():
        if name.startswith("_") or name.isupper():
            continue
        if inspect.isfunction(member) or isinstance(member, property):
            names.append(name)
    return sorted(names)


def test_every_trial_scheduler_method_is_overridden():
    interface = _trial_scheduler_interface()
    # The installed Ray's interface (guards against a silently un-delegated new method).
    assert {"on_trial_result", "choose_trial_to_run", "set_search_properties", "save", "restore"} <= set(
        interface
    )
    missing = [name for name in interface if name not in vars(MetaAwareScheduler)]
    assert missing == []


def test_every_call_reaches_the_wrapped_scheduler(tmp_path):
    base = _Recording()
    scheduler = MetaAwareScheduler(base, lr_floor_patience=5)
    trial = _Trial("t1")
    assert scheduler.set_search_properties("val_loss", "min", config={}) is True
    assert scheduler.metric == "val_loss" == base.metric
    assert scheduler.supports_buffered_results is base.supports_buffered_results
    scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, trial, {"val_loss": 1.0}) == TrialScheduler.PAUSE
    assert scheduler.choose_trial_to_run(None) == "chosen"
    scheduler.on_trial_complete(None, trial, {"val_loss": 1.0})
    scheduler.on_trial_error(None, _Trial("t2"))
    scheduler.on_trial_remove(None, _Trial("t3"))
    scheduler.save(str(tmp_path / "sched.pkl"))
    scheduler.restore(str(tmp_path / "sched.pkl"))
    assert base.calls == [
        ("set_search_properties", "val_loss", "min", ("config",)),
        ("on_trial_add", "t1"),
        ("on_trial_result", "t1"),
        ("choose_trial_to_run",),
        ("on_trial_complete", "t1"),
        ("on_trial_error", "t2"),
        ("on_trial_remove", "t3"),
        ("save",),
        ("restore", "base-state"),
    ]
    assert "recording" in scheduler.debug_string()


def test_stopped_result_never_reaches_base_and_inf_metric_reaches_it_as_nan():
    base = _Recording()
    scheduler = MetaAwareScheduler(base)
    scheduler.set_search_properties("val_loss", "min")
    trial = _Trial("t")
    scheduler.on_trial_add(None, trial)
    assert scheduler.on_trial_result(None, trial, {"val_loss": float("inf"), "diverged": True}) == STOP
    assert [c[0] for c in base.calls[1:]] == ["on_trial_add"]
    scheduler.on_trial_complete(None, trial, {"val_loss": float("inf")})
    assert math.isnan(base.results[-1]["val_loss"])


def test_save_restore_round_trip_with_asha(tmp_path):
    def make():
        return MetaAwareScheduler(
            ASHAScheduler(
                time_attr="training_iteration", metric="val_loss", mode="min", max_t=8, grace_period=1
            ),
            lr_floor_patience=2,
        )

    a = make()
    trial = _Trial("x")
    a.on_trial_add(None, trial)
    a.on_trial_result(None, trial, {"training_iteration": 1, "val_loss": 1.0, "lr_at_floor": True})
    a.on_trial_result(None, trial, {"training_iteration": 2, "val_loss": 1.0, "lr_at_floor": True})
    path = str(tmp_path / "s.pkl")
    a.save(path)
    b = make()
    b.restore(path)
    assert b.state_dict() == a.state_dict()
    assert b.base._trial_info.keys() == a.base._trial_info.keys()
    # The restored scheduler continues the streak exactly where the first left it.
    assert (
        b.on_trial_result(None, trial, {"training_iteration": 3, "val_loss": 1.0, "lr_at_floor": True})
        == STOP
    )


def test_fifo_base_without_save_still_saves_own_state(tmp_path):
    a = MetaAwareScheduler(lr_floor_patience=3)
    a.on_trial_add(None, _Trial("q"))
    a.on_trial_result(None, _Trial("q"), {"val_loss": 2.0, "lr_at_floor": True})
    a.save(str(tmp_path / "f.pkl"))
    b = MetaAwareScheduler(lr_floor_patience=3)
    b.restore(str(tmp_path / "f.pkl"))
    assert b.state_dict() == a.state_dict()


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"base": "asha"}, TypeError, "base="),
        ({"base": MetaAwareScheduler()}, TypeError, "once"),
        ({"lr_floor_patience": 0}, ValueError, "lr_floor_patience=0"),
        ({"stop_on_lr_floor_patience": 1.5}, TypeError, "stop_on_lr_floor_patience=1.5"),
        ({"lr_floor_patience": 2, "stop_on_lr_floor_patience": 2}, ValueError, "not both"),
        ({"divergence_factor": 1.0}, ValueError, "divergence_factor=1.0"),
        ({"min_delta": -1}, ValueError, "min_delta=-1"),
        ({"stop_on_divergence": "yes"}, TypeError, "stop_on_divergence='yes'"),
        ({"metric": ""}, TypeError, "metric=''"),
        ({"loss_keys": "val_loss"}, TypeError, "loss_keys='val_loss'"),
    ],
)
def test_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[").replace(".", r"\.")):
        MetaAwareScheduler(**kwargs)


# --------------------------------------------------------------------------- real Tune runs
class _HalveToFloor(MetaOptimizer):
    """Halves every group's lr at each decision; the wrapper clamps it at ``min_lr``."""

    def decide(self, metrics, step, groups):
        return [HParamUpdate(g.index, "lr", g.lr / 2, "halve") for g in groups]


def _regression_trainable(config):
    """Real torch training reporting the provided trainable's keys.

    ``kind``: "ok" (sensible lr), "diverge" (a huge lr: the loss overflows) or "floor" (the lr is
    halved down to its ``min_lr`` floor, where validation stops improving). Unlike the provided
    trainable it keeps reporting after divergence, so only the scheduler can stop it early.
    """
    torch.manual_seed(config["seed"])
    x = torch.randn(256, 8)
    w_true = torch.randn(8, 1)
    y = x @ w_true + 0.1 * torch.randn(256, 1)
    xv = torch.randn(128, 8)
    yv = xv @ w_true
    model = torch.nn.Linear(8, 1)
    kind = config["kind"]
    lr = {"ok": 0.05, "diverge": 50.0, "floor": 0.05}[kind]
    min_lr = 1e-9
    inner = torch.optim.SGD(model.parameters(), lr=lr)
    meta = (
        _HalveToFloor(update_frequency=1, min_lr=min_lr)
        if kind == "floor"
        else _HalveToFloor(update_frequency=10**9)
    )
    opt = OptimizerWrapper(inner, meta)
    best = math.inf
    for it in range(config["iters"]):
        for _ in range(5):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.update_hyperparameters({"loss": loss.detach()})
            opt.step()
        with torch.no_grad():
            val = float(torch.nn.functional.mse_loss(model(xv), yv))
        train = float(loss)
        best = min(best, val) if math.isfinite(val) else best
        lrs = [g["lr"] for g in opt.param_groups]
        tune.report(
            {
                "step": (it + 1) * 5,
                "train_loss": train,
                "val_loss": val,
                "best_val_loss": best,
                "lr": lrs[0],
                "lr/0": lrs[0],
                "diverged": not (math.isfinite(train) and math.isfinite(val)),
                "lr_at_floor": all(v <= min_lr for v in lrs),
            }
        )


@pytest.fixture(scope="module", autouse=True)
def _pickle_this_module_by_value():
    # Ray workers cannot import this test module by name: ship its functions by value.
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _run(tmp_path, scheduler, kinds, iters):
    tuner = tune.Tuner(
        tune.with_resources(_regression_trainable, {"cpu": 1}),
        param_space={"kind": tune.grid_search(kinds), "seed": 0, "iters": iters},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="sched", verbose=0),
    )
    grid = tuner.fit()
    return {r.config["kind"]: r for r in grid}


@pytest.mark.ray
@pytest.mark.slow
def test_fifo_run_stops_diverging_and_floored_trials(ray_session, tmp_path):
    iters = 12
    scheduler = MetaAwareScheduler(FIFOScheduler(), stop_on_divergence=True, lr_floor_patience=3)
    results = _run(tmp_path, scheduler, ["ok", "diverge", "floor"], iters)
    assert all(r.error is None for r in results.values())
    iterations = {k: r.metrics["training_iteration"] for k, r in results.items()}
    assert iterations["ok"] == iters  # the healthy trial ran to the end
    assert results["diverge"].metrics["diverged"] is True
    assert iterations["diverge"] < 4  # overflows within a few reports and is stopped at once
    assert results["floor"].metrics["lr_at_floor"] is True
    assert iterations["floor"] < iters
    reasons = {results[k].metrics["trial_id"]: k for k in results}
    stopped = {reasons[t]: why.split(":")[0] for t, why in scheduler.stopped_trials.items()}
    assert stopped == {"diverge": "diverged", "floor": "lr_floor"}
    assert results["ok"].metrics["val_loss"] < 0.1


@pytest.mark.ray
@pytest.mark.slow
def test_asha_run_stops_diverging_trial_and_asha_still_works(ray_session, tmp_path):
    iters = 8
    asha = ASHAScheduler(time_attr="training_iteration", max_t=iters, grace_period=2, reduction_factor=2)
    scheduler = MetaAwareScheduler(asha, stop_on_divergence=True)
    results = _run(tmp_path, scheduler, ["ok", "diverge", "floor"], iters)
    assert all(r.error is None for r in results.values())
    assert scheduler.metric == "val_loss"  # TuneConfig's metric reached ASHA through the wrapper
    iterations = {k: r.metrics["training_iteration"] for k, r in results.items()}
    assert iterations["diverge"] < 4
    assert results["diverge"].metrics["diverged"] is True
    assert iterations["ok"] == iters
    # ASHA itself kept deciding: its rungs recorded the finite trials and no -inf cutoff exists.
    recorded = [v for _, rung in asha._brackets[0]._rungs for v in rung.values()]
    assert recorded and all(not math.isinf(v) for v in recorded)
    assert [why.split(":")[0] for why in scheduler.stopped_trials.values()] == ["diverged"]


@pytest.mark.ray
@pytest.mark.slow
def test_provided_trainable_under_meta_aware_scheduler(ray_session, tmp_path):
    """The provided trainable's own ``diverged``/``lr_at_floor`` reports drive the scheduler."""
    from ray_metaopt.tune import trainable_with_resources

    cases = {
        "ok": {"meta": "none", "optimizer": "adamw", "optimizer_config": {"lr": 1e-2}, "meta_config": {}},
        "diverge": {"meta": "none", "optimizer": "sgd", "optimizer_config": {"lr": 1e4}, "meta_config": {}},
        # Every decision cuts (threshold 1e6 never counts as improvement) down to min_lr=1e-4.
        "floor": {
            "meta": "plateau",
            "optimizer": "adamw",
            "optimizer_config": {"lr": 1e-2},
            "meta_config": {
                "patience": 0,
                "lr_factor": 0.1,
                "threshold": 1e6,
                "min_lr": 1e-4,
                "update_frequency": 10,
            },
        },
    }
    space = {
        "_case": tune.grid_search(list(cases)),
        "task": "teacher_student",
        "max_steps": 120,
        "eval_interval": 10,
    }
    space["grad_clip"] = None  # let the huge lr blow the weights up
    for key in ("meta", "optimizer", "optimizer_config", "meta_config"):
        space[key] = tune.sample_from(lambda config, key=key: cases[config["_case"]][key])
    # min_delta=1.0: no val_loss change on this task counts as an improvement.
    scheduler = MetaAwareScheduler(FIFOScheduler(), lr_floor_patience=3, min_delta=1.0)
    grid = tune.Tuner(
        trainable_with_resources({"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="provided", verbose=0),
    ).fit()
    assert not grid.errors
    by_case = {r.config["_case"]: r for r in grid}
    reasons = {by_case[c].metrics["trial_id"]: c for c in by_case}
    stopped = {reasons[t]: why.split(":")[0] for t, why in scheduler.stopped_trials.items()}
    assert stopped == {"diverge": "diverged", "floor": "lr_floor"}
    assert by_case["ok"].metrics["step"] == 120
    assert by_case["diverge"].metrics["diverged"] is True
    floor = by_case["floor"].metrics
    # Report 1 sets the best value, reports 2 and 3 follow a 10x cut each: the floor is reached at
    # report 3, and after 3 reports at the floor (3, 4, 5) the scheduler stops the trial.
    assert floor["lr_at_floor"] is True and floor["lr"] == pytest.approx(1e-4)
    assert floor["training_iteration"] == 5 and floor["step"] == 50


@pytest.mark.ray
@pytest.mark.slow
def test_wrapped_pbt_still_exploits(ray_session, tmp_path):
    """PBT under the wrapper: its exploit/explore (pause, clone checkpoint, perturb) still runs."""
    from ray.tune.schedulers import PopulationBasedTraining

    from ray_metaopt.tune import trainable_with_resources

    pbt = PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=2,
        quantile_fraction=0.5,
        hyperparam_mutations={"optimizer_config": {"lr": [1e-3, 3e-3, 1e-2]}},
        synch=True,  # every trial reaches each perturbation point: an exploit always happens
    )
    scheduler = MetaAwareScheduler(pbt)
    grid = tune.Tuner(
        trainable_with_resources({"cpu": 1}),
        param_space={
            "task": "teacher_student",
            "meta": "none",
            "optimizer_config": {"lr": tune.grid_search([1e-4, 1e-2])},
            "max_steps": 40,
            "eval_interval": 10,
        },
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="pbt", verbose=0),
    ).fit()
    assert not grid.errors
    steps = [(r.metrics.get("step"), r.metrics.get("stop_reason"), r.metrics.get("done")) for r in grid]
    assert all(step == 40 for step, _, _ in steps), (steps, scheduler.stopped_trials)
    assert scheduler.base._num_perturbations > 0  # PBT exploited through the wrapper
    assert scheduler.stopped_trials == {}


def test_pickles_like_tuner_stores_it():
    """Tuner pickles its TuneConfig (tuner.pkl, Tuner.restore): the wrapper must survive it."""
    import pickle

    from ray import cloudpickle

    a = MetaAwareScheduler(
        ASHAScheduler(time_attr="training_iteration", metric="val_loss", mode="min", max_t=4),
        lr_floor_patience=2,
    )
    a.on_trial_add(None, _Trial("p"))
    a.on_trial_result(None, _Trial("p"), {"training_iteration": 1, "val_loss": 1.0, "lr_at_floor": True})
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        b = loads(dumps(a))
        assert b.state_dict() == a.state_dict()
        assert b.metric == "val_loss" and b.lr_floor_patience == 2
        assert b._time_attr == "training_iteration"  # wrapped scheduler's attributes stay reachable
