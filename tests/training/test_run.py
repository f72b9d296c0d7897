"""A training run without Ray: config checks, the training loop, reports, checkpoints, resume, the paired reference."""

from __future__ import annotations

import math
import os

import pytest
import torch
from trial_helpers import CONTRACT_KEYS, TIMING_KEYS, collect as _collect, small_config as _config

from ray_metaopt.training import TrainingRun, default_config, resolve_config
from ray_metaopt.training.builders import FixedHyperparameters, available_optimizers, build_meta_optimizer
from ray_metaopt.training.checkpoint import CHECKPOINT_FILE


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _without_timing(result):
    return {k: v for k, v in result.items() if k not in TIMING_KEYS}


# ----------------------------------------------------------------------------- config checks
@pytest.mark.parametrize(
    "config, error, match",
    [
        ({}, ValueError, r"config must set 'task', one of \['charlm', 'digits', 'digits_cnn', 'mnist1d', 'moe', 'sequence', 'teacher_student'"),
        (
            {"task": "teacher"},
            ValueError,
            r"task must be one of \['charlm', 'digits', 'digits_cnn', 'mnist1d', 'moe', 'sequence', 'teacher_student'",
        ),
        (
            {"task": "moe", "max_step": 3},
            ValueError,
            r"unknown keys \['max_step'\]; valid keys are \[.*'max_steps'",
        ),
        ({"task": "moe", "optimizer": "adamm"}, ValueError, r"optimizer must be one of \[.*'adamw'.*'sgd'"),
        ({"task": "moe", "optimizer": "lbfgs"}, ValueError, "needs a closure"),
        (
            {"task": "moe", "meta": "platoe"},
            ValueError,
            r"meta must be one of \['none', 'plateau', 'advanced_plateau'",
        ),
        ({"task": "moe", "max_steps": 0}, ValueError, "max_steps must be >= 1, got max_steps=0"),
        ({"task": "moe", "eval_interval": 2.5}, TypeError, "eval_interval must be an int"),
        ({"task": "moe", "grad_clip": -1.0}, ValueError, "grad_clip must be in"),
        ({"task": "moe", "device": "tpu"}, ValueError, r"device must be one of \['auto', 'cpu', 'cuda'\]"),
        (
            {"task": "moe", "schedule": "step"},
            ValueError,
            r"schedule must be one of \['constant', 'cosine', 'linear'\]",
        ),
        ({"task": "moe", "schedule_config": {"warmup": 3}}, ValueError, r"unknown keys \['warmup'\]"),
        ({"task": "moe", "meta_config": [1]}, TypeError, "meta_config must be a dict"),
        (
            {"task": "moe", "metric_reduction": "max"},
            ValueError,
            r"metric_reduction must be one of \['last', 'mean'\]",
        ),
        ({"task": "moe", "paired_reference": "yes"}, TypeError, "paired_reference must be a bool, got paired_reference='yes'"),
    ],
)
def test_resolve_config_rejects(config, error, match):
    with pytest.raises(error, match=match):
        resolve_config(config)


@pytest.mark.parametrize(
    "overrides, error, match",
    [
        (
            {"meta_config": {"patienc": 3}},
            ValueError,
            r"meta_config has keys \['patienc'\] .* accepted keys are \[.*'patience'",
        ),
        (
            {"meta_config": {"patience": -1}},
            ValueError,
            "invalid meta_config for meta='plateau': patience must be >= 0",
        ),
        ({"meta": "none", "meta_config": {"patience": 3}}, ValueError, r"accepted keys are \[\]"),
        ({"optimizer_config": {"lr": -1.0}}, ValueError, r"optimizer_config\['lr'\] must be in"),
        ({"optimizer_config": {"lr": float("nan")}}, ValueError, "must not be NaN"),
        (
            {"optimizer_config": {"momentum": 0.9}},
            ValueError,
            r"AdamW does not accept; accepted keys are \[.*'betas'",
        ),
        ({"optimizer_config": {"betas": (1.5, 0.9)}}, ValueError, "AdamW rejected optimizer_config"),
        ({"task_config": {"scale": 0}}, ValueError, "scale must be >= 1"),
        ({"meta_config": {"update_frequency": 7}}, ValueError, "update_frequency must be a multiple of 20"),
    ],
)
def test_invalid_configs_fail_when_the_trial_builds(overrides, error, match):
    with pytest.raises(error, match=match):
        TrainingRun(_config(**overrides))


def test_defaults():
    defaults = default_config()
    assert defaults["optimizer"] == "adamw" and defaults["meta"] == "plateau"
    assert defaults["optimizer_config"] == {"lr": 1e-3}
    assert defaults["metric_reduction"] == "mean"
    resolved = resolve_config({"task": "digits", "_note": "user keys starting with _ are ignored"})
    assert resolved.max_steps == defaults["max_steps"] and resolved.task == "digits"
    assert "adamw" in available_optimizers() and "lbfgs" not in available_optimizers()


def test_trainable_defaults_decide_at_evaluations_on_val_loss():
    run = TrainingRun({"task": "teacher_student", "eval_interval": 25, "device": "cpu"})
    assert run.wrapper.meta_optimizer.update_frequency == 25
    assert run.wrapper.meta_optimizer.monitor == "val_loss"
    explicit = TrainingRun(
        {"task": "teacher_student", "meta_config": {"monitor": "loss", "update_frequency": 5}}
    )
    assert explicit.wrapper.meta_optimizer.update_frequency == 5


def test_meta_none_never_reads_metrics():
    meta = build_meta_optimizer("none")
    assert isinstance(meta, FixedHyperparameters)
    assert not any(meta.should_update(step) for step in range(100))


# ----------------------------------------------------------------------------- the loop
@pytest.mark.parametrize(
    "max_steps, eval_interval, expected_steps",
    [(80, 20, [20, 40, 60, 80]), (50, 20, [20, 40, 50]), (10, 20, [10]), (3, 1, [1, 2, 3])],
)
def test_reports_at_every_evaluation_and_at_the_end(max_steps, eval_interval, expected_steps):
    run = TrainingRun(_config(max_steps=max_steps, eval_interval=eval_interval, meta="none", meta_config={}))
    results = _collect(run)
    assert [r["step"] for r in results] == expected_steps
    # Only the last report ends the trial in Tune (no scheduler acts on it).
    assert [r["done"] for r in results] == [False] * (len(expected_steps) - 1) + [True]


@pytest.mark.parametrize(
    "checkpoint_interval, expected_steps",
    [(1, [20, 40, 60, 80]), (2, [40, 80]), (3, [60, 80]), (0, [80])],
)
def test_checkpoint_interval(checkpoint_interval, expected_steps):
    run = TrainingRun(_config(meta="none", meta_config={}, checkpoint_interval=checkpoint_interval))
    with_checkpoint = []

    def report(result, checkpoint_dir):
        if checkpoint_dir is not None:
            assert os.path.exists(os.path.join(checkpoint_dir, CHECKPOINT_FILE))
            with_checkpoint.append(result["step"])

    run.train(report)
    assert with_checkpoint == expected_steps


def test_result_contents():
    run = TrainingRun(_config())
    results = _collect(run)
    for result in results:
        assert CONTRACT_KEYS <= set(result)
        assert {"lr/decay", "lr/no_decay", "weight_decay/decay", "weight_decay/no_decay"} <= set(result)
        assert result["teacher_student/noise_floor"] == pytest.approx(0.01)
        assert "teacher_student/excess_loss" in result and result["device"] == "cpu"
        assert result["diverged"] is False
        assert result["meta/strategy"] == "PlateauMetaOptimizer"
    assert results[0]["best_val_loss"] == results[0]["val_loss"]
    assert [r["best_val_loss"] for r in results] == [
        min(r["val_loss"] for r in results[: i + 1]) for i in range(len(results))
    ]
    assert all(r["steps_per_second"] > 0 for r in results)
    # Each decision is reported once, in the report that follows it.
    reported = [d for r in results for d in r["meta/decisions"]]
    assert len(reported) == results[-1]["meta/num_decisions"] == len(run.wrapper.decisions)
    assert all(set(d) == {"step", "group", "name", "hparam", "old", "new", "reason"} for d in reported)


def test_lr_trajectory_and_lr_at_floor():
    results = _collect(TrainingRun(_config()))
    table = [
        (r["step"], r["lr"], r["lr/no_decay"], r["lr_at_floor"], len(r["meta/decisions"])) for r in results
    ]
    assert table == [
        (20, 1e-2, 1e-2, False, 0),  # first decision: the first value is the best so far
        (40, 5e-3, 5e-3, False, 2),  # no improvement: both groups halved
        (60, 2.5e-3, 2.5e-3, True, 2),  # halved onto min_lr
        (80, 2.5e-3, 2.5e-3, True, 0),  # at the floor: nothing left to cut
    ]


def test_train_loss_is_the_mean_since_the_last_report():
    run = TrainingRun(_config(meta="none", meta_config={}, max_steps=40))
    losses = []
    original = run.task.training_step

    def spy(model, batch_size):
        out = original(model, batch_size)
        losses.append(out.loss.item())
        return out

    run.task.training_step = spy
    results = _collect(run)
    assert results[0]["train_loss"] == pytest.approx(sum(losses[:20]) / 20, rel=1e-6)
    assert results[1]["train_loss"] == pytest.approx(sum(losses[20:]) / 20, rel=1e-6)


def test_divergence_reports_and_stops_with_finite_weights():
    run = TrainingRun(
        _config(optimizer="sgd", optimizer_config={"lr": 1e4}, meta="none", meta_config={}, grad_clip=None)
    )
    checkpoints = []

    def report(result, checkpoint_dir):
        checkpoints.append(checkpoint_dir)
        results.append(result)

    results = []
    last = run.train(report)
    assert last is results[-1] and last["diverged"] is True
    assert last["step"] < 20 and last["diverged_reason"].startswith("non-finite loss at step")
    assert all(r["diverged"] is False for r in results[:-1])
    assert last["done"] is False  # a scheduler may still act on it (PBT can exploit a diverged trial)
    assert checkpoints[-1] is None  # no checkpoint of a diverged state
    assert math.isnan(last["val_loss"]) and last["best_val_loss"] == math.inf  # no evaluation yet
    assert all(torch.isfinite(p).all() for p in run.model.parameters())


def test_cosine_schedule_under_no_strategy():
    run = TrainingRun(
        _config(meta="none", meta_config={}, schedule="cosine", schedule_config={"final_factor": 0.1})
    )
    lrs = [r["lr"] for r in _collect(run)]
    expected = [1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 80))) for s in (20, 40, 60, 80)]
    assert lrs == pytest.approx(expected, rel=1e-9)


def test_strategy_cut_persists_through_the_schedule():
    # Halving plateau on a linear schedule with warmup: the cut scales the schedule (attach_scheduler).
    run = TrainingRun(_config(schedule="linear", schedule_config={"warmup_steps": 10}))
    results = _collect(run)
    shape = [1.0 - (s - 10) / 70 for s in (20, 40, 60, 80)]
    cuts = [1.0, 0.5, 0.25, 0.25]
    assert [r["lr"] for r in results[:2]] == pytest.approx(
        [1e-2 * shape[0] * cuts[0], 1e-2 * shape[1] * cuts[1]]
    )


# ----------------------------------------------------------------------------- checkpoints
def test_checkpoint_is_plain_data(tmp_path):
    run = TrainingRun(_config(max_steps=20))
    _collect(run)
    run.save(str(tmp_path))
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    assert state["extra"]["step"] == 20
    assert state["hparams"] == {"lr": 1e-2}
    assert state["optimizer"]["meta_optimizer"]["type"] == "PlateauMetaOptimizer"


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "task": "digits",
            "task_config": {"dropout": 0.2},
            "meta": "advanced_plateau",
            "meta_config": {"patience": 1},
        },
        {"task": "moe", "task_config": {"val_size": 128}, "meta": "smart_expert_gate", "meta_config": {}},
        {
            "meta": "none",
            "meta_config": {},
            "schedule": "cosine",
            "optimizer": "sgd",
            "optimizer_config": {"lr": 0.05, "momentum": 0.9},
        },
        {"optimizer": "schedulefree:AdamWScheduleFree", "optimizer_config": {"lr": 1e-2, "warmup_steps": 10}},
    ],
    ids=["plateau", "digits-dropout", "moe-smart-gate", "cosine-sgd", "schedule-free"],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, overrides):
    config = _config(**overrides)
    reference = _collect(TrainingRun(config))
    saved = tmp_path / "ckpt"
    _collect(TrainingRun(config), stop_at=40, keep_checkpoint_at=40, into=saved)
    resumed_run = TrainingRun(config)
    resumed_run.restore(str(saved))
    assert resumed_run.step == 40
    resumed = _collect(resumed_run)
    assert [_without_timing(r) for r in resumed] == [_without_timing(r) for r in reference[2:]]


def test_schedule_free_optimizer_trains_evaluates_and_saves_in_its_modes(tmp_path):
    # AdamWScheduleFree refuses to step outside train mode, and its evaluation weights (x) differ
    # from its training weights (y): the trial must train in train mode and evaluate, checkpoint
    # and finish in eval mode.
    config = _config(
        optimizer="schedulefree:AdamWScheduleFree", optimizer_config={"lr": 1e-2, "warmup_steps": 10}
    )
    run = TrainingRun(config)
    results = _collect(run, keep_checkpoint_at=40, into=tmp_path / "ckpt")
    assert [r["step"] for r in results] == [20, 40, 60, 80] and not results[-1]["diverged"]
    assert results[-1]["meta/num_decisions"] >= 1  # the plateau strategy changed the lr on top
    optimizer = run.wrapper.optimizer
    assert all(not g["train_mode"] for g in optimizer.param_groups)  # finished in eval mode
    at_x = run.task.evaluate(run.model)["val_loss"]
    assert at_x == pytest.approx(results[-1]["val_loss"], rel=1e-6)  # reported at the eval point
    optimizer.train()
    at_y = run.task.evaluate(run.model)["val_loss"]
    assert abs(at_y - at_x) > 1e-6 * abs(at_x)  # the two points differ, so the check above means something
    # The checkpoint written mid-training holds the eval point; training went on in train mode.
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT_FILE, weights_only=True)
    assert all(not g["train_mode"] for g in state["optimizer"]["param_groups"])


# ----------------------------------------------------------------------------- PBT rule
def _checkpoint_at_40(tmp_path, config):
    saved = tmp_path / "ckpt"
    _collect(TrainingRun(config), stop_at=40, keep_checkpoint_at=40, into=saved)
    return str(saved)


def test_perturbed_lr_wins_and_strategy_keeps_its_state(tmp_path):
    saved = _checkpoint_at_40(tmp_path, _config())
    donor_meta = torch.load(os.path.join(saved, CHECKPOINT_FILE), weights_only=True)["optimizer"][
        "meta_optimizer"
    ]
    run = TrainingRun(_config(optimizer_config={"lr": 4e-3}))
    run.restore(saved)
    # The donor was at 5e-3 after one halving; the configured 4e-3 applies to every group.
    assert [g["lr"] for g in run.wrapper.param_groups] == pytest.approx([4e-3, 4e-3])
    assert [s.initial_lr for s in run.wrapper.group_states()] == pytest.approx([8e-3, 8e-3])
    assert run.wrapper.meta_optimizer.state_dict() == donor_meta
    results = _collect(run)
    assert results[0]["config_overrides"] == [
        {"hparam": "lr", "saved": 1e-2, "configured": 4e-3, "factor": pytest.approx(0.8)}
    ]
    assert results[1]["config_overrides"] == []  # present (stable schema), empty until set
    # The strategy goes on from its state: the next decision halves 4e-3 onto min_lr 2.5e-3.
    assert [(r["step"], r["lr"]) for r in results] == [(60, 2.5e-3), (80, 2.5e-3)]


def test_plain_resume_keeps_the_saved_lr(tmp_path):
    saved = _checkpoint_at_40(tmp_path, _config())
    run = TrainingRun(_config())
    run.restore(saved)
    assert [g["lr"] for g in run.wrapper.param_groups] == [5e-3, 5e-3]
    assert run.config_overrides == []


def test_perturbed_lr_keeps_ratios_between_groups(tmp_path):
    config = _config(
        task="moe",
        task_config={"gate_lr_scale": 0.5, "val_size": 64},
        meta="none",
        meta_config={},
        optimizer_config={"lr": 1e-3},
    )
    saved = _checkpoint_at_40(tmp_path, config)
    run = TrainingRun({**config, "optimizer_config": {"lr": 2e-3}})
    run.restore(saved)
    lrs = {g["name"]: g["lr"] for g in run.wrapper.param_groups}
    assert lrs == pytest.approx(
        {
            "gate": 1e-3,
            "gate_no_decay": 1e-3,
            "expert": 2e-3,
            "expert_no_decay": 2e-3,
            "shared_no_decay": 2e-3,
        }
    )


def test_perturbed_weight_decay_and_momentum(tmp_path):
    config = _config(
        optimizer="sgd",
        optimizer_config={"lr": 1e-2, "momentum": 0.9, "weight_decay": 1e-3},
        meta="none",
        meta_config={},
    )
    saved = _checkpoint_at_40(tmp_path, config)
    run = TrainingRun({**config, "optimizer_config": {"lr": 1e-2, "momentum": 0.5, "weight_decay": 4e-3}})
    run.restore(saved)
    groups = {g["name"]: g for g in run.wrapper.param_groups}
    assert groups["decay"]["weight_decay"] == pytest.approx(4e-3)
    assert groups["no_decay"]["weight_decay"] == 0.0  # the no-decay group stays without decay
    assert groups["decay"]["momentum"] == groups["no_decay"]["momentum"] == 0.5
    assert groups["decay"]["lr"] == 1e-2
    assert {c["hparam"] for c in run.config_overrides} == {"momentum", "weight_decay"}


def test_perturbed_lr_sets_the_schedule_peak(tmp_path):
    config = _config(meta="none", meta_config={}, schedule="cosine")
    saved = _checkpoint_at_40(tmp_path, config)
    run = TrainingRun({**config, "optimizer_config": {"lr": 2e-2}})
    run.restore(saved)
    assert run.schedulers[0].base_lrs == pytest.approx([2e-2, 2e-2])
    # Half-way through the cosine the lr is half the (new) peak, and it goes on along the curve.
    assert run.wrapper.param_groups[0]["lr"] == pytest.approx(1e-2)
    results = _collect(run)
    assert results[0]["lr"] == pytest.approx(2e-2 * 0.5 * (1 + math.cos(math.pi * 60 / 80)))


def test_changed_strategy_type_starts_fresh(tmp_path):
    saved = _checkpoint_at_40(tmp_path, _config())
    run = TrainingRun(_config(meta="advanced_plateau", meta_config={"patience": 3}))
    run.restore(saved)
    fresh = build_meta_optimizer(
        "advanced_plateau", {"patience": 3, "monitor": "val_loss", "update_frequency": 20}
    )
    assert run.wrapper.meta_optimizer.state_dict() == fresh.state_dict()
    assert run.step == 40


# ----------------------------------------------------------------------------- under Tune


def _rl_rewards_seen(config):
    """Train; at every report, the rewards the RL strategy has given so far (its pending decisions)."""
    run = TrainingRun(config)
    seen = []
    run.train(lambda result, d: seen.extend(t["reward"] for t in run.wrapper.meta_optimizer.pending if t["reward"] is not None))
    return run, seen


def test_paired_reference_is_the_base_run_and_a_keep_policy_earns_exactly_zero():
    """paired_reference=True gives the strategy a meta='none' run's losses at the same noise: a
    policy that (almost surely) keeps the base lr then earns reward 0 at every interval, where
    without the reference it earns the raw, noisy log-loss drops."""
    base = _config(meta="none", meta_config={}, schedule="cosine", max_steps=100)
    none_run = TrainingRun(base)
    finals = []
    none_run.train(lambda result, d: finals.append(result["val_loss"]))
    rl = {**base, "meta": "rl", "meta_config": {"update_frequency": 10, "initial_keep_prob": 1 - 1e-9,
                                                   "wd_actions": None, "return_horizon": 50}}
    run, rewards = _rl_rewards_seen({**rl, "paired_reference": True})
    assert run.reference["val_loss"][100] == finals[-1]
    assert len(run.reference["loss"]) == 100
    assert rewards and all(r == 0.0 for r in rewards)
    _, unpaired = _rl_rewards_seen(rl)
    assert len(unpaired) == len(rewards) and any(abs(r) > 1e-3 for r in unpaired)


def test_paired_reference_curves_are_reported_beside_the_trials_own():
    """With paired_reference the results carry the base schedule's curves over the same steps
    (a reader pairs them, as the benchmark's learning curve does): for a policy that keeps the
    base lr they equal the trial's own train_loss and val_loss; without it the keys are absent."""
    base = _config(meta="none", meta_config={}, schedule="cosine", max_steps=60, eval_interval=20)
    keep = {**base, "meta": "rl", "meta_config": {"update_frequency": 10, "initial_keep_prob": 1 - 1e-9,
                                                     "wd_actions": None}, "paired_reference": True}
    results = _collect(TrainingRun(keep))
    assert [r["step"] for r in results] == [20, 40, 60]
    assert [r["reference_val_loss"] for r in results] == [r["val_loss"] for r in results]
    assert [r["reference_train_loss"] for r in results] == pytest.approx([r["train_loss"] for r in results], rel=1e-6)
    plain = _collect(TrainingRun(base))
    assert "reference_val_loss" not in plain[0] and "reference_train_loss" not in plain[0]
    assert [r["val_loss"] for r in plain] == [r["val_loss"] for r in results]


def test_paired_reference_refuses_a_base_schedule_other_than_the_trials_own():
    config = _config(meta="rl", meta_config={"update_frequency": 10, "base_schedule": "cosine"}, paired_reference=True)
    with pytest.raises(ValueError, match="got meta_config base_schedule='cosine'; use schedule='cosine' with base_schedule=None"):
        TrainingRun(config)


def test_a_training_run_needs_no_ray(tmp_path):
    # The training layer (TrainingRun, builders, tasks, checkpoint files) imports and runs with Ray
    # unavailable; only the Tune adapters (the trainable's report call, callbacks, stopper) need it.
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from ray_metaopt.training import TrainingRun\n"
        "config = {'task': 'teacher_student', 'meta': 'plateau', 'max_steps': 40, 'eval_interval': 20}\n"
        "run = TrainingRun(config); seen = []\n"
        "run.train(lambda m, c: seen.append(m['val_loss']))\n"
        f"run.save({str(tmp_path)!r})\n"
        f"again = TrainingRun(config); again.restore({str(tmp_path)!r})\n"
        "assert again.step == run.step == 40 and len(seen) == 2, (again.step, seen)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
