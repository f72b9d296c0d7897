"""Small trial configs and a report collector shared by the training-run and trainable tests."""

from __future__ import annotations

import shutil

CONTRACT_KEYS = {
    "step",
    "train_loss",
    "val_loss",
    "best_val_loss",
    "lr",
    "meta/num_decisions",
    "meta/num_skipped",
    "meta/decisions",
    "diverged",
    "lr_at_floor",
    "steps_per_second",
}
TIMING_KEYS = {"steps_per_second"}

# A plateau rule that never sees an improvement after its first decision (abs threshold 1e9):
# every later decision halves every group's lr, down to min_lr. Decisions at evaluations.
HALVING_PLATEAU = {
    "patience": 0,
    "lr_factor": 0.5,
    "threshold": 1e9,
    "threshold_mode": "abs",
    "min_lr": 2.5e-3,
}


def small_config(**overrides):
    config = {
        "task": "teacher_student",
        "task_config": {"val_size": 256},
        "optimizer": "adamw",
        "optimizer_config": {"lr": 1e-2},
        "meta": "plateau",
        "meta_config": dict(HALVING_PLATEAU),
        "max_steps": 80,
        "eval_interval": 20,
        "batch_size": 32,
        "device": "cpu",
    }
    config.update(overrides)
    return config


class StopTraining(Exception):
    pass


def collect(run, stop_at=None, keep_checkpoint_at=None, into=None):
    """Train, returning every result; copy the checkpoint reported at ``keep_checkpoint_at``."""
    results = []

    def report(result, checkpoint_dir):
        results.append(result)
        if keep_checkpoint_at is not None and result["step"] == keep_checkpoint_at:
            assert checkpoint_dir is not None
            shutil.copytree(checkpoint_dir, into)
        if stop_at is not None and result["step"] >= stop_at:
            raise StopTraining

    try:
        run.train(report)
    except StopTraining:
        pass
    return results
