"""The provided trainable under Tune: Tune's loggers, errors and fake GPUs, ``Tuner.restore``."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from trial_helpers import CONTRACT_KEYS, collect as _collect, small_config as _config

from ray_metaopt.tune import TrainingRun, metaopt_trainable, trainable_with_resources


@pytest.mark.ray
@pytest.mark.slow
def test_tunes_own_loggers_take_the_results_without_warnings(ray_session, tmp_path):
    # Tune's TensorBoard logger tries to log every non-empty list as a histogram and warns (once
    # per process) about lists of dicts such as `meta/decisions`; the JSON logger keeps them.
    import json
    import logging

    from ray import tune
    from ray.util.debug import reset_log_once

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    handler = Collect()
    tbx_logger = logging.getLogger("ray.tune.logger.tensorboardx")
    tbx_logger.addHandler(handler)
    reset_log_once("invalid_tbx_value")
    try:
        analysis = tune.run(
            metaopt_trainable,
            config=_config(max_steps=60),
            storage_path=str(tmp_path),
            verbose=0,
        )
    finally:
        tbx_logger.removeHandler(handler)
    assert [m for m in handler.messages if "invalid value" in m] == []
    trial = analysis.trials[0]
    assert trial.status == "TERMINATED" and trial.last_result["meta/num_decisions"] >= 2
    assert list(trial.last_result["meta/decisions"]) and "lr" in trial.last_result["meta/decisions"][0]["hparam"]
    events = [p for p in os.listdir(trial.local_path) if p.startswith("events.out.tfevents")]
    assert events  # TensorBoard got the scalars
    with open(os.path.join(trial.local_path, "result.json")) as f:
        logged = [json.loads(line) for line in f]
    decisions = [d for r in logged for d in r["meta/decisions"]]  # the JSON log keeps every decision
    assert len(decisions) == trial.last_result["meta/num_decisions"]


@pytest.mark.ray
@pytest.mark.slow
def test_tune_run_strategies_errors_and_fake_gpus(ray_session, tmp_path):
    from ray import tune

    resources_before = getattr(metaopt_trainable, "_resources", None)
    analysis = tune.run(
        trainable_with_resources({"cpu": 1, "gpu": 0.5}),
        config={
            "task": "moe",
            "task_config": {"val_size": 128},
            "meta": tune.grid_search(["none", "smart_expert_gate", "bogus"]),
            "max_steps": 30,
            "eval_interval": 10,
            "batch_size": 32,
        },
        storage_path=str(tmp_path),
        raise_on_failed_trial=False,
        verbose=0,
    )
    by_meta = {t.config["meta"]: t for t in analysis.trials}
    assert by_meta["bogus"].status == "ERROR"
    with open(by_meta["bogus"].error_file) as f:
        assert "meta must be one of ['none', 'plateau', 'advanced_plateau', 'expert_gate'" in f.read()
    for meta in ("none", "smart_expert_gate"):
        trial = by_meta[meta]
        assert trial.status == "TERMINATED"
        result = trial.last_result
        assert CONTRACT_KEYS <= set(result)
        assert result["step"] == 30 and result["training_iteration"] == 3
        assert {"lr/gate", "lr/expert", "moe/routing_entropy", "moe/expert_specialization"} <= set(result)
        # Ray hands out fake GPU ids here; the trial must fall back to the CPU.
        assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert by_meta["none"].last_result["meta/num_decisions"] == 0
    assert by_meta["smart_expert_gate"].last_result["meta/strategy"] == "SmartExpertGateMetaOptimizer"
    assert getattr(metaopt_trainable, "_resources", None) is resources_before  # shared function untouched


@pytest.mark.ray
@pytest.mark.slow
def test_tuner_restore_completes_an_interrupted_experiment(ray_session, tmp_path):
    from ray import tune

    config = _config(max_steps=60, eval_interval=10)
    reference = _collect(TrainingRun(config))

    class InterruptAfter(tune.Callback):
        """Sends the driver the signal Tune treats like Ctrl+C once a trial reached ``step``.

        Tuner.restore brings the run config (and this callback) back: a marker file keeps it
        from interrupting the resumed run too.
        """

        def __init__(self, step, marker):
            self.step, self.marker = step, marker

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if result["step"] >= self.step and not os.path.exists(self.marker):
                open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGUSR1)

    tune_config = tune.TuneConfig(metric="val_loss", mode="min")
    first = tune.Tuner(
        metaopt_trainable,
        param_space={**config, "device": "auto"},
        tune_config=tune_config,
        run_config=tune.RunConfig(
            name="interrupted",
            storage_path=str(tmp_path),
            verbose=0,
            callbacks=[InterruptAfter(20, str(tmp_path / "interrupted.marker"))],
        ),
    ).fit()
    assert first[0].metrics["step"] < 60  # really interrupted

    path = os.path.join(str(tmp_path), "interrupted")
    assert tune.Tuner.can_restore(path)
    grid = tune.Tuner.restore(path, trainable=metaopt_trainable).fit()
    assert grid.num_errors == 0
    final = grid[0]
    assert final.metrics["step"] == 60
    # Every step was reported, and from the resume on the values are the uninterrupted run's.
    frame = final.metrics_dataframe.drop_duplicates("step", keep="last").sort_values("step")
    assert frame["step"].tolist() == [10, 20, 30, 40, 50, 60]
    assert frame["val_loss"].tolist() == [r["val_loss"] for r in reference]
    assert frame["lr"].tolist() == [r["lr"] for r in reference]
