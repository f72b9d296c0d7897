"""Bring-your-own-loop helpers (reporting.py) and examples/custom_trainable.py under Tune."""

from __future__ import annotations

import math
import os
import runpy
from pathlib import Path

import pytest
import torch

from ray_metaopt import OptimizerWrapper
from ray_metaopt.training.builders import FixedHyperparameters
from ray_metaopt.training.checkpoint import CHECKPOINT_FILE, REPORTER_FILE
from ray_metaopt.training.reporter import MetricsReporter, group_labels, hparam_metrics
from ray_metaopt.tune.reporting import load_checkpoint, report_metrics, save_checkpoint, wrap_optimizer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_trainable.py"


def _model_and_opt(lr=0.1, momentum=0.9, meta="plateau", meta_config=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    groups = [
        {"params": model[0].parameters(), "name": "body", "lr": lr},
        {"params": model[1].parameters(), "name": "head", "lr": lr / 10},
    ]
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=1e-3)
    config = {"patience": 0, "lr_factor": 0.5, "threshold": 1e9, "threshold_mode": "abs", "min_lr": 1e-4, "noise_aware": False}
    return model, wrap_optimizer(optimizer, meta, meta_config if meta_config is not None else config)


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x = torch.randn(8, 3, generator=torch.Generator().manual_seed(step))
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        opt.update_hyperparameters({"loss": loss.detach()}, step=step)


def test_wrap_optimizer_by_name_instance_and_errors():
    model, opt = _model_and_opt()
    assert isinstance(opt, OptimizerWrapper) and type(opt.meta_optimizer).__name__ == "PlateauMetaOptimizer"
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    assert isinstance(wrap_optimizer(plain, FixedHyperparameters()).meta_optimizer, FixedHyperparameters)
    with pytest.raises(ValueError, match="only used when meta is a name"):
        wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), FixedHyperparameters(), {"patience": 1})
    with pytest.raises(ValueError, match="meta must be one of"):
        wrap_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), "plateu")


def test_hparam_metrics_and_labels():
    _, opt = _model_and_opt()
    metrics = hparam_metrics(opt)
    assert metrics == {
        "lr/body": 0.1,
        "weight_decay/body": 1e-3,
        "lr/head": pytest.approx(0.01),
        "weight_decay/head": 1e-3,
        "lr": 0.1,
        "lr_at_floor": False,
    }
    assert group_labels([{"name": "a"}, {}, {"name": "a"}, {"name": "b"}]) == ["0", "1", "2", "b"]
    for group in opt.param_groups:
        group["lr"] = 1e-4  # the strategy's min_lr
    assert hparam_metrics(opt)["lr_at_floor"] is True


def test_report_metrics_builds_the_trainable_names():
    model, opt = _model_and_opt()
    _train(model, opt, 3)  # decisions at steps 0 (first value), 1 and 2 (two halvings)
    first = report_metrics(
        opt, {"step": 3, "train_loss": 0.5, "val_loss": 0.7, "val_accuracy": torch.tensor(0.25)}, report=False
    )
    assert first["step"] == 3 and first["best_val_loss"] == 0.7 and first["diverged"] is False
    assert first["val_accuracy"] == 0.25
    assert first["lr/body"] == pytest.approx(0.025) and first["lr/head"] == pytest.approx(0.0025)
    assert len(first["meta/decisions"]) == first["meta/num_decisions"] == 4
    second = report_metrics(opt, {"step": 4, "train_loss": 0.4, "val_loss": 0.9}, report=False)
    assert second["best_val_loss"] == 0.7 and second["meta/decisions"] == []
    third = report_metrics(opt, {"step": 5, "train_loss": float("nan"), "val_loss": 0.9}, report=False)
    assert third["diverged"] is True
    with pytest.raises(ValueError, match=r"missing \['val_loss'\]"):
        report_metrics(opt, {"step": 5, "train_loss": 0.1}, report=False)


def test_metrics_reporter_prefixes_extras_and_constants():
    _, opt = _model_and_opt()
    reporter = MetricsReporter(opt, prefix="digits", constants={"val_size": 10.0})
    result = reporter.metrics(step=1, train_loss=1.0, val_loss=2.0, extras={"val_accuracy": 0.5})
    assert result["digits/val_accuracy"] == 0.5 and result["digits/val_size"] == 10.0
    assert math.isnan(result["steps_per_second"])  # no start or earlier report to measure from
    reporter.restart_timer(10)
    assert reporter.metrics(step=30, train_loss=1.0, val_loss=2.0)["steps_per_second"] > 0
    reporter.load_state_dict(reporter.state_dict())  # a restore: the time in between is not counted
    assert math.isnan(reporter.metrics(step=50, train_loss=1.0, val_loss=2.0)["steps_per_second"])


def test_checkpoint_round_trip_is_exact_and_plain(tmp_path):
    model, opt = _model_and_opt()
    _train(model, opt, 4)
    rng = torch.Generator().manual_seed(5)
    save_checkpoint(
        tmp_path, model, opt, hparams={"lr": 0.1, "momentum": 0.9}, step=4, data_rng=rng.get_state()
    )
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["hparams"] == {"lr": 0.1, "momentum": 0.9}

    model2, opt2 = _model_and_opt()
    extra = load_checkpoint(tmp_path, model2, opt2, hparams={"lr": 0.1, "momentum": 0.9})
    assert extra["step"] == 4 and extra["config_overrides"] == []
    assert torch.equal(extra["data_rng"], rng.get_state())
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt2.meta_optimizer.state_dict() == opt.meta_optimizer.state_dict()
    _train(model, opt, 3, start=4)
    _train(model2, opt2, 3, start=4)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "configured, expected_lrs, expected_momentum",
    [
        ({"lr": 0.1, "momentum": 0.9}, [0.025, 0.0025], 0.9),  # resume: the saved (cut) values stay
        ({"lr": 0.2, "momentum": 0.9}, [0.2, 0.02], 0.9),  # PBT doubled lr: 0.2 applies, ratio 10 kept
        ({"lr": 0.1, "momentum": 0.5}, [0.025, 0.0025], 0.5),  # PBT changed momentum only
    ],
)
def test_load_checkpoint_configured_values_win_when_changed(
    tmp_path, configured, expected_lrs, expected_momentum
):
    model, opt = _model_and_opt()
    _train(model, opt, 3)  # lr cut twice: body 0.025, head 0.0025
    save_checkpoint(tmp_path, model, opt, hparams={"lr": 0.1, "momentum": 0.9})
    model2, opt2 = _model_and_opt(lr=configured["lr"], momentum=configured["momentum"])
    load_checkpoint(tmp_path, model2, opt2, hparams=configured)
    assert [g["lr"] for g in opt2.param_groups] == pytest.approx(expected_lrs)
    assert [g["momentum"] for g in opt2.param_groups] == [expected_momentum] * 2


def test_reporter_state_is_passed_explicitly_and_stored_once(tmp_path):
    # save_checkpoint does not look the wrapper's reporter up behind the caller's back: without
    # reporter= it stores none (report_metrics writes REPORTER_FILE after the report); with one,
    # the checkpoint holds it and no second copy is written.
    model, opt = _model_and_opt()
    _train(model, opt, 3)
    report_metrics(opt, {"step": 3, "train_loss": 0.5, "val_loss": 0.7}, report=False)
    save_checkpoint(tmp_path, model, opt, step=3)
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)["reporter"] is None
    own = MetricsReporter(opt)
    own.metrics(step=3, train_loss=0.5, val_loss=0.6)
    save_checkpoint(tmp_path, model, opt, reporter=own, step=3)
    assert os.listdir(tmp_path) == [CHECKPOINT_FILE]
    model2, opt2 = _model_and_opt()
    restored = MetricsReporter(opt2)
    load_checkpoint(tmp_path, model2, opt2, reporter=restored)
    assert restored.best_val_loss == 0.6
    result = report_metrics(opt2, {"step": 4, "train_loss": 0.5, "val_loss": 0.8}, reporter=restored, report=False)
    assert result["best_val_loss"] == 0.6


def test_report_metrics_stores_the_reporter_state_next_to_the_checkpoint(tmp_path):
    model, opt = _model_and_opt()
    _train(model, opt, 3)
    save_checkpoint(tmp_path, model, opt, step=3)
    report_metrics(
        opt, {"step": 3, "train_loss": 0.5, "val_loss": 0.7}, checkpoint_dir=tmp_path, report=False
    )
    assert (tmp_path / REPORTER_FILE).exists()
    model2, opt2 = _model_and_opt()
    load_checkpoint(tmp_path, model2, opt2)
    after = report_metrics(opt2, {"step": 4, "train_loss": 0.5, "val_loss": 0.8}, report=False)
    assert after["best_val_loss"] == 0.7  # remembered across the restore
    assert after["meta/decisions"] == []  # the 4 decisions were reported before the checkpoint


@pytest.mark.ray
@pytest.mark.slow
def test_custom_trainable_example_under_tune(ray_session, tmp_path):
    from ray import tune

    # run_path gives the functions a module name that is not importable, so Tune ships them by value.
    example = runpy.run_path(str(EXAMPLE), run_name="custom_trainable_example")
    analysis = tune.run(
        example["train_fn"],
        config={
            "lr": 1e-2,
            "weight_decay": 1e-4,
            "batch_size": 32,
            "steps": 40,
            "eval_every": 10,
            "seed": tune.grid_search([0, 1]),
        },
        metric="val_loss",
        mode="min",
        storage_path=str(tmp_path),
        verbose=0,
    )
    assert [t.status for t in analysis.trials] == ["TERMINATED", "TERMINATED"]
    for trial in analysis.trials:
        result = trial.last_result
        assert result["step"] == 40 and result["training_iteration"] == 4
        assert {
            "lr",
            "lr/0",
            "weight_decay/0",
            "meta/num_decisions",
            "best_val_loss",
            "lr_at_floor",
            "val_accuracy",
        } <= set(result)
        with trial.checkpoint.as_directory() as directory:
            assert sorted(os.listdir(directory)) == sorted([CHECKPOINT_FILE, REPORTER_FILE])
            state = torch.load(os.path.join(directory, CHECKPOINT_FILE), weights_only=True)
        assert state["extra"]["step"] == 40 and state["hparams"] == {"lr": 1e-2, "weight_decay": 1e-4}
    assert analysis.trials[0].last_result["val_loss"] != analysis.trials[1].last_result["val_loss"]
