"""A real PBT run: after an exploit the perturbed lr is what the trial trains with."""

from __future__ import annotations

import pytest

from ray_metaopt.tune import metaopt_trainable

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EVAL_INTERVAL = 15
LRS = [1e-3, 3e-3, 1e-2, 3e-2]
MAX_STEPS = 4 * EVAL_INTERVAL


def test_pbt_exploit_applies_the_perturbed_lr(ray_session, tmp_path):
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    class Collect(tune.Callback):
        def __init__(self):
            self.results = []

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.results.append((trial.trial_id, result))

    collect = Collect()
    pbt = PopulationBasedTraining(
        time_attr="training_iteration",
        perturbation_interval=2,
        hyperparam_mutations={"optimizer_config": {"lr": LRS}},
        quantile_fraction=0.5,
        resample_probability=0.0,
        synch=True,  # both trials reach each perturbation point: the exploits are certain
    )
    analysis = tune.run(
        metaopt_trainable,
        config={
            "task": "teacher_student",
            "task_config": {"val_size": 256},
            # A strategy with state but no cut in this short run, so lr must equal the config's.
            "meta": "plateau",
            "meta_config": {"patience": 100},
            "optimizer_config": {"lr": tune.grid_search([1e-3, 1e-2])},
            "max_steps": MAX_STEPS,
            "eval_interval": EVAL_INTERVAL,
            "batch_size": 32,
        },
        scheduler=pbt,
        metric="val_loss",
        mode="min",
        reuse_actors=True,
        storage_path=str(tmp_path),
        callbacks=[collect],
        verbose=0,
    )
    assert [t.status for t in analysis.trials] == ["TERMINATED", "TERMINATED"]
    # An exploit shows as a trial whose configured lr changed between two of its reports.
    # With two trials the donor is the other one; its lr is the last one it reported.
    exploited, last_lr = [], {}
    for trial_id, result in collect.results:
        configured = result["config"]["optimizer_config"]["lr"]
        if trial_id in last_lr and last_lr[trial_id] != configured:
            donor_lr = next(lr for t, lr in last_lr.items() if t != trial_id)
            exploited.append((result, donor_lr))
        last_lr[trial_id] = configured
    assert exploited, "PBT made no exploit"
    for result, donor_lr in exploited:
        configured = result["config"]["optimizer_config"]["lr"]
        assert configured in LRS
        # Loading the donor's optimizer state did not bring its lr back: the perturbed one applies.
        assert result["lr"] == result["lr/decay"] == result["lr/no_decay"] == configured
        overrides = result.get("config_overrides")
        if configured == donor_lr:  # a "noop" perturbation at the end of LRS: nothing to override
            assert not overrides, overrides
        else:
            assert overrides and overrides[0]["hparam"] == "lr" and overrides[0]["configured"] == configured
        # The trial continued from the donor's checkpoint instead of starting over (an exploit of
        # a finished donor restores its final checkpoint: it reports once more at max_steps).
        assert result["step"] == min(EVAL_INTERVAL * result["training_iteration"], MAX_STEPS)
        assert result["step"] > EVAL_INTERVAL
    # Between exploits every report keeps the configured lr (no stale value resurfaces).
    for _, result in collect.results:
        assert result["lr"] == result["config"]["optimizer_config"]["lr"]
