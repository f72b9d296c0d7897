"""MetaStopper: rules honouring metric/mode, ``stop_reason`` in every result (ResultGrid, progress.csv,
after Tuner.restore), a stable result schema, and PBT's last perturbation (issue 16)."""

from __future__ import annotations

import csv
import glob
import os
import signal
import sys

import pytest
from ray import tune
from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining

from ray_metaopt.tune import MetaAwareScheduler, MetaStopper, trainable_with_resources

SCHEMA_KEYS = {"stop_reason", "diverged_reason", "config_overrides"}


@pytest.fixture(scope="module", autouse=True)
def _pickle_this_module_by_value():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


# --------------------------------------------------------------------------- rules, no Ray run
def test_mode_max_rising_metric_is_an_improvement():
    rising = [{"val_acc": 0.5 + 0.1 * i, "lr_at_floor": True} for i in range(4)]
    stopper = MetaStopper(metric="val_acc", mode="max", lr_floor_patience=2)
    assert [stopper("t", dict(r)) for r in rising] == [False] * 4
    falling = [{"val_acc": 0.8 - 0.1 * i, "lr_at_floor": True} for i in range(4)]
    assert [stopper("u", dict(r)) for r in falling] == [False, False, True, True]
    assert stopper.stopped_trials["u"].startswith("lr_floor: ")


def test_scheduler_takes_mode_from_search_properties_and_has_a_metric_at_once():
    scheduler = MetaAwareScheduler(metric="val_acc", lr_floor_patience=2)
    assert scheduler.metric == "val_acc"  # was None right after construction
    assert scheduler.set_search_properties("val_acc", "max")
    assert scheduler.stopper.mode == "max"
    decisions = [
        scheduler.on_trial_result(None, _T("a"), {"val_acc": v, "lr_at_floor": True}) for v in (0.5, 0.6, 0.7, 0.8)
    ]
    assert decisions == ["CONTINUE"] * 4
    # TuneConfig's metric/mode fill in what the scheduler was not given.
    plain = MetaAwareScheduler(lr_floor_patience=2)
    plain.set_search_properties("score", "max")
    assert (plain.stopper.metric, plain.stopper.mode) == ("score", "max")


class _T:
    def __init__(self, trial_id):
        self.trial_id, self.config, self.last_result = trial_id, {}, {}


def test_stop_reason_written_into_the_result_it_gets():
    stopper = MetaStopper()
    result = {"val_loss": 1.0, "diverged": True, "stop_reason": ""}
    assert stopper("t", result) is True
    assert result["stop_reason"] == "diverged: trial reported diverged=True"
    own = {"val_loss": 1.0, "diverged": True, "stop_reason": "diverged: non-finite loss at step 3"}
    assert stopper("v", own) and own["stop_reason"] == "diverged: non-finite loss at step 3"  # kept
    with pytest.raises(ValueError, match="mode='max'"):
        MetaStopper(mode="max", divergence_factor=3.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        MetaStopper(mode="up")


# --------------------------------------------------------------------------- real Tune runs
def _acc_trainable(config):
    """Reports a rising val_acc with every lr at its floor (what a max-mode user sees)."""
    for i in range(5):
        tune.report({"val_acc": 0.5 + 0.1 * i, "lr_at_floor": True, "val_loss": 1.0, "stop_reason": ""})


@pytest.mark.ray
def test_max_mode_from_tune_config_reaches_the_rules(ray_session, tmp_path):
    grid = tune.Tuner(
        tune.with_resources(_acc_trainable, {"cpu": 1}),
        tune_config=tune.TuneConfig(
            metric="val_acc", mode="max", scheduler=MetaAwareScheduler(lr_floor_patience=2)
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="acc", verbose=0),
    ).fit()
    assert grid.num_errors == 0
    assert grid[0].metrics["training_iteration"] == 5  # not stopped: val_acc kept rising


CASES = {
    "ok": {"optimizer": "adamw", "optimizer_config": {"lr": 1e-2}, "grad_clip": 1.0},
    "diverge": {"optimizer": "sgd", "optimizer_config": {"lr": 1e4}, "grad_clip": None},
}


def _space(**extra):
    space = {
        "_case": tune.grid_search(list(CASES)),
        "task": "teacher_student",
        "meta": "none",
        "max_steps": 40,
        "eval_interval": 10,
        **extra,
    }
    for key in ("optimizer", "optimizer_config", "grad_clip"):
        space[key] = tune.sample_from(lambda config, key=key: CASES[config["_case"]][key])
    return space


def _progress_rows(path):
    rows = {}
    for file in glob.glob(os.path.join(path, "*", "progress.csv")):
        with open(file) as f:
            data = list(csv.DictReader(f))
        rows[data[-1]["trial_id"]] = data
    return rows


@pytest.mark.ray
@pytest.mark.slow
def test_tuner_asha_with_stopper_records_why_every_trial_ended(ray_session, tmp_path):
    asha = ASHAScheduler(time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=2)
    grid = tune.Tuner(
        trainable_with_resources({"cpu": 1}),
        param_space=_space(),
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=asha),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha", verbose=0, stop=MetaStopper()),
    ).fit()
    assert grid.num_errors == 0
    by_case = {r.config["_case"]: r for r in grid}
    assert by_case["ok"].metrics["stop_reason"] == "max_steps"
    assert by_case["diverge"].metrics["stop_reason"].startswith("diverged: ")
    rows = _progress_rows(os.path.join(str(tmp_path), "asha"))
    assert len(rows) == 2
    for data in rows.values():
        assert SCHEMA_KEYS <= set(data[0])  # the header has them from the first result on
        assert all(row["stop_reason"] == "" for row in data[:-1])  # empty while running
        assert data[-1]["stop_reason"]


@pytest.mark.ray
@pytest.mark.slow
def test_scheduler_records_the_wrapped_schedulers_stop(ray_session, tmp_path):
    """ASHA under the wrapper stops the worse trial at a rung: the Result says so."""
    asha = ASHAScheduler(time_attr="training_iteration", max_t=4, grace_period=1, reduction_factor=2)
    space = {
        "task": "teacher_student",
        "meta": "none",
        "max_steps": 40,
        "eval_interval": 10,
        "optimizer_config": {"lr": tune.grid_search([1e-2, 1e-6])},
    }
    grid = tune.Tuner(
        trainable_with_resources({"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_loss", mode="min", scheduler=MetaAwareScheduler(asha), max_concurrent_trials=1
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="asha_wrapped", verbose=0),
    ).fit()
    assert grid.num_errors == 0
    reasons = {r.config["optimizer_config"]["lr"]: r.metrics["stop_reason"] for r in grid}
    assert reasons[1e-2] == "max_steps"
    assert reasons[1e-6].startswith("scheduler: AsyncHyperBandScheduler stopped the trial")


@pytest.mark.ray
@pytest.mark.slow
def test_pbt_perturbation_at_the_last_report_ends_each_trial_once(ray_session, tmp_path):
    seen_steps = []

    class RecordingPBT(PopulationBasedTraining):
        def on_trial_result(self, tune_controller, trial, result):
            seen_steps.append(result["step"])
            return super().on_trial_result(tune_controller, trial, result)

    pbt = RecordingPBT(
        time_attr="training_iteration",
        perturbation_interval=2,  # divides the 4 reports: a perturbation point at the very end
        quantile_fraction=0.5,
        hyperparam_mutations={"optimizer_config": {"lr": [1e-3, 3e-3, 1e-2]}},
        synch=True,
    )
    grid = tune.Tuner(
        trainable_with_resources({"cpu": 1}),
        param_space={
            "task": "teacher_student",
            "meta": "none",
            "optimizer_config": {"lr": tune.grid_search([1e-5, 1e-2])},
            "max_steps": 40,
            "eval_interval": 10,
        },
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=MetaAwareScheduler(pbt), reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="pbt_end", verbose=0),
    ).fit()
    assert grid.num_errors == 0
    assert pbt._num_perturbations > 0
    # A trial's last report carries Tune's done=True: PBT never sees it, so it cannot exploit a
    # finished trial (before, two tied trials at the end exploited each other forever).
    assert seen_steps and max(seen_steps) < 40
    ids = [r.metrics["trial_id"] for r in grid]
    assert len(set(ids)) == len(ids) == 2  # each trial once, under its own id
    for result in grid:
        assert result.metrics["step"] == 40 and result.metrics["stop_reason"] == "max_steps"
        assert result.metrics["done"] is True
        # Its own final lr (after an exploit: the perturbed config), not the donor's result.
        assert result.metrics["lr"] == pytest.approx(result.config["optimizer_config"]["lr"])


@pytest.mark.ray
@pytest.mark.slow
def test_interrupted_then_restored_run_keeps_stop_reasons(ray_session, tmp_path):
    marker = str(tmp_path / "interrupted.marker")

    class InterruptAfter(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result["step"] >= 20 and not os.path.exists(marker):
                open(marker, "w").close()
                os.kill(os.getpid(), signal.SIGUSR1)

    # Plain grid values (Tuner.restore cannot resolve sample_from for trials not started yet).
    space = {
        "task": "teacher_student",
        "meta": "none",
        "optimizer": "sgd",
        "grad_clip": None,
        "optimizer_config": {"lr": tune.grid_search([1e-2, 1e4])},
        "max_steps": 60,
        "eval_interval": 10,
    }
    first = tune.Tuner(
        trainable_with_resources({"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", max_concurrent_trials=1),
        run_config=tune.RunConfig(
            name="restored", storage_path=str(tmp_path), verbose=0, stop=MetaStopper(), callbacks=[InterruptAfter()]
        ),
    ).fit()
    assert any(r.metrics.get("step", 0) < 60 and not r.metrics.get("diverged") for r in first)
    path = os.path.join(str(tmp_path), "restored")
    grid = tune.Tuner.restore(path, trainable=trainable_with_resources({"cpu": 1})).fit()
    assert grid.num_errors == 0
    by_lr = {r.config["optimizer_config"]["lr"]: r for r in grid}
    assert by_lr[1e-2].metrics["stop_reason"] == "max_steps" and by_lr[1e-2].metrics["step"] == 60
    assert by_lr[1e4].metrics["stop_reason"].startswith("diverged: ")
    # Restoring once more (nothing left to run) still shows why each trial ended.
    again = tune.Tuner.restore(path, trainable=trainable_with_resources({"cpu": 1})).get_results()
    assert sorted(r.metrics["stop_reason"][:8] for r in again) == ["diverged", "max_step"]


@pytest.mark.ray
@pytest.mark.slow
def test_rebuild_from_result_gives_the_trained_model_and_meta_state(ray_session, tmp_path):
    from ray_metaopt.tune import rebuild_from_result

    grid = tune.Tuner(
        trainable_with_resources({"cpu": 1}),
        param_space={
            "task": "teacher_student",
            "meta": "plateau",
            "meta_config": {"patience": 0, "threshold": 1e6},  # decides (and cuts) at every evaluation
            "max_steps": 40,
            "eval_interval": 10,
        },
        tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="rebuild", verbose=0),
    ).fit()
    best = grid.get_best_result()
    run = rebuild_from_result(best)
    assert run.step == 40
    assert run.wrapper.log.num_decisions == best.metrics["meta/num_decisions"] > 0
    assert run.wrapper.param_groups[0]["lr"] == pytest.approx(best.metrics["lr"])
    assert run._evaluate()["val_loss"] == pytest.approx(best.metrics["val_loss"])
    with pytest.raises(TypeError, match="result="):
        rebuild_from_result(object())


@pytest.mark.ray
@pytest.mark.slow
def test_readme_tune_block_runs_as_written(ray_session, capsys):
    """The README's Tune example, shrunk (steps, samples) but otherwise exactly as written."""
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    section = readme[readme.index("## Ray Tune") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for old, new in (('"max_steps": 1000', '"max_steps": 40'), ('"eval_interval": 50', '"eval_interval": 10'),
                     ("eval_interval=50", "eval_interval=10"), ("num_samples=4", "num_samples=2")):
        assert old in code
        code = code.replace(old, new)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    grid = namespace["grid"]
    assert grid.num_errors == 0 and len(grid) == 2
    assert all(r.metrics["stop_reason"] in ("max_steps",) or r.metrics["stop_reason"].startswith("lr_floor")
               for r in grid)
    assert capsys.readouterr().out.count("\n") >= 2  # both prints ran


class _Records:
    """Collects the warnings of Tune's experiment-state logger (it does not propagate to pytest)."""

    def __init__(self):
        import logging

        self.messages: list[str] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.messages.append(record.getMessage())
        self.logger = logging.getLogger("ray.tune.execution.experiment_state")

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self.messages

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("checkpoint_interval, loud", [(1, True), (0, False)])
def test_checkpoint_cadence_the_readme_calls_quiet_is_quiet(ray_session, tmp_path, checkpoint_interval, loud):
    # Item 8: with CheckpointConfig(num_to_keep=2) a checkpoint at every evaluation of a fast trial
    # forces an experiment snapshot every two evaluations and Tune warns; the README's setting
    # (checkpoints further apart than a few seconds; here only the final one) is silent.
    space = {"task": "teacher_student", "meta": "none", "max_steps": 400, "eval_interval": 5,
             "checkpoint_interval": checkpoint_interval}
    with _Records() as messages:
        grid = tune.Tuner(
            trainable_with_resources({"cpu": 1}),
            param_space=space,
            tune_config=tune.TuneConfig(metric="val_loss", mode="min"),
            run_config=tune.RunConfig(
                storage_path=str(tmp_path), name="cadence", verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            ),
        ).fit()
    assert grid.num_errors == 0 and grid[0].checkpoint is not None
    warned = any("snapshotting has been triggered multiple times" in m for m in messages)
    assert warned == loud, messages
