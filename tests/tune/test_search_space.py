"""meta_search_space: every sample builds its strategy; the spaces drive a real Tune searcher."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.sample import Domain

from ray_metaopt import OptimizerWrapper
from ray_metaopt.expert_gate import ExpertGateMetaOptimizer, SmartExpertGateMetaOptimizer
from ray_metaopt.plateau import AdvancedPlateauMetaOptimizer, PlateauMetaOptimizer
from ray_metaopt.rl.meta_optimizer import RLMetaOptimizer
from ray_metaopt.tune.search_space import (
    meta_search_space,
    meta_search_space_names,
    register_meta_search_space,
    sample_meta_config,
)

CLASSES = {
    "plateau": PlateauMetaOptimizer,
    "advanced_plateau": AdvancedPlateauMetaOptimizer,
    "expert_gate": ExpertGateMetaOptimizer,
    "smart_expert_gate": SmartExpertGateMetaOptimizer,
    "rl": RLMetaOptimizer,
}


def test_every_provided_strategy_has_a_space():
    assert set(meta_search_space_names()) >= set(CLASSES) | {"none"}
    assert meta_search_space("none") == {}


@pytest.mark.parametrize("strategy", sorted(CLASSES))
def test_every_sample_builds_the_strategy(strategy):
    space = meta_search_space(strategy)
    assert space and all(isinstance(v, Domain) for v in space.values())
    seen: dict[str, set] = {k: set() for k in space}
    n = 60 if strategy == "rl" else 200
    for seed in range(n):
        config = sample_meta_config(space, seed=seed)
        for key, value in config.items():
            assert not type(value).__module__.startswith("numpy"), (key, value)
            seen[key].add(repr(value))
        meta = CLASSES[strategy](**config)
        for key, value in config.items():
            if hasattr(meta, key) and not isinstance(value, list):
                assert getattr(meta, key) == value
    # The samples really vary (each key took several values).
    assert all(len(values) >= 2 for values in seen.values()), seen


def test_domains_match_the_documented_ranges():
    space = meta_search_space("plateau")
    for seed in range(300):
        c = sample_meta_config(space, seed=seed)
        assert 1 <= c["patience"] <= 10
        assert 0.1 <= c["lr_factor"] < 0.8
        assert 1e-4 <= c["threshold"] <= 5e-2
        assert 0 <= c["cooldown"] <= 3
        assert "update_frequency" not in c  # the trainable decides at its evaluations
    with_eval = meta_search_space("plateau", eval_interval=20)
    assert {sample_meta_config(with_eval, seed=s)["update_frequency"] for s in range(100)} == {20, 40, 100}


def test_fixed_values_exclude_and_fresh_dicts():
    a = meta_search_space(
        "plateau", monitor="val_loss", update_frequency=20, patience=tune.randint(2, 4), exclude=("cooldown",)
    )
    assert a["monitor"] == "val_loss" and a["update_frequency"] == 20 and "cooldown" not in a
    assert {sample_meta_config(a, seed=s)["patience"] for s in range(50)} == {2, 3}
    b = meta_search_space("plateau")
    assert "cooldown" in b and "monitor" not in b
    assert a["lr_factor"] is not b["lr_factor"]  # never a shared domain object


def test_val_loss_monitor_needs_a_fixed_update_frequency():
    with pytest.raises(ValueError, match="update_frequency=<eval_interval>"):
        meta_search_space("advanced_plateau", update_frequency=tune.choice([1, 5]))  # watches val_loss
    with pytest.raises(ValueError, match="update_frequency=<eval_interval>"):
        meta_search_space("plateau", monitor="val_loss", update_frequency=tune.choice([1, 5]))
    assert meta_search_space("plateau", monitor="val_loss", update_frequency=50)["update_frequency"] == 50
    # Another monitor needs no evaluation: any update_frequency is fine.
    assert isinstance(meta_search_space("plateau", monitor="loss", update_frequency=tune.choice([1, 5]))[
        "update_frequency"], Domain)
    with pytest.raises(ValueError, match="eval_interval=0"):
        meta_search_space("plateau", eval_interval=0)


# The task each strategy is meant for in the provided trainable.
SPACE_TASKS = {
    "plateau": "teacher_student",
    "advanced_plateau": "teacher_student",
    "expert_gate": "moe",
    "smart_expert_gate": "moe",
    "rl": "teacher_student",
    "none": "teacher_student",
}


@pytest.mark.parametrize("eval_interval", [None, 10])
@pytest.mark.parametrize("strategy", sorted(SPACE_TASKS))
def test_every_sample_builds_a_training_run(strategy, eval_interval):
    """What the README offers "for any searcher": every sample is a valid trial of the trainable."""
    from ray_metaopt.tune import TrainingRun

    space = meta_search_space(strategy, eval_interval=eval_interval)
    for seed in range(10 if strategy == "rl" else 30):
        meta_config = sample_meta_config(space, seed=seed)
        run = TrainingRun(
            {
                "task": SPACE_TASKS[strategy],
                "meta": strategy,
                "meta_config": meta_config,
                "eval_interval": eval_interval or 20,
                "max_steps": 100,
            }
        )
        assert run.wrapper.meta_optimizer.update_frequency % (eval_interval or 20) == 0 or strategy not in (
            "plateau",
            "advanced_plateau",
        )


def test_bad_names_list_the_choices():
    with pytest.raises(ValueError, match=r"strategy must be one of \[.*'plateau'.*\], got strategy='plato'"):
        meta_search_space("plato")
    with pytest.raises(ValueError, match=r"\['nope'\].*keys are"):
        meta_search_space("plateau", exclude=("nope",))
    with pytest.raises(TypeError, match="exclude="):
        meta_search_space("plateau", exclude="patience")


def test_register_a_user_space_is_deprecated_and_needs_a_registered_strategy():
    from ray_metaopt.registry import register_strategy, unregister_strategy

    with pytest.warns(DeprecationWarning, match="search_space="), pytest.raises(ValueError, match="my_strategy"):
        register_meta_search_space("my_strategy", lambda: {"alpha": tune.uniform(0.0, 1.0)})
    register_strategy("my_strategy", PlateauMetaOptimizer)
    try:
        with pytest.warns(DeprecationWarning):
            register_meta_search_space("my_strategy", lambda: {"alpha": tune.uniform(0.0, 1.0)})
        assert 0.0 <= sample_meta_config(meta_search_space("my_strategy"), seed=1)["alpha"] <= 1.0
        with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="space_fn="):
            register_meta_search_space("my_strategy", {"alpha": 1})
    finally:
        unregister_strategy("my_strategy")


# --------------------------------------------------------------------------- a real searcher
@pytest.fixture(scope="module", autouse=True)
def _pickle_this_module_by_value():
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _plateau_trainable(config):
    """Trains a small regression with PlateauMetaOptimizer built from the sampled meta_config."""
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = x @ torch.ones(4, 1)
    model = torch.nn.Linear(4, 1)
    meta = PlateauMetaOptimizer(**config["meta_config"])
    opt = OptimizerWrapper(torch.optim.SGD(model.parameters(), lr=0.05), meta)
    for step in range(40):
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.update_hyperparameters({"loss": loss.detach()})
        opt.step()
    tune.report({"val_loss": float(loss), "lr": opt.param_groups[0]["lr"], "patience": meta.patience})


@pytest.mark.ray
@pytest.mark.slow
def test_basic_variant_searcher_tunes_meta_config(ray_session, tmp_path):
    num_samples = 4
    tuner = tune.Tuner(
        tune.with_resources(_plateau_trainable, {"cpu": 1}),
        param_space={"meta": "plateau", "meta_config": meta_search_space("plateau")},
        tune_config=tune.TuneConfig(
            metric="val_loss",
            mode="min",
            num_samples=num_samples,
            search_alg=BasicVariantGenerator(random_state=7),
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="space", verbose=0),
    )
    grid = tuner.fit()
    assert not grid.errors and len(grid) == num_samples
    configs = [r.config["meta_config"] for r in grid]
    assert len({tuple(sorted(c.items())) for c in configs}) == num_samples  # distinct samples
    for result, config in zip(grid, configs):
        assert 1 <= config["patience"] <= 10 and 0.1 <= config["lr_factor"] < 0.8
        assert result.metrics["patience"] == config["patience"]  # the strategy got the sampled value
        assert math.isfinite(result.metrics["val_loss"])
    best = grid.get_best_result()
    assert best.metrics["val_loss"] == min(r.metrics["val_loss"] for r in grid)


@pytest.mark.ray
@pytest.mark.slow
def test_provided_trainable_runs_every_plateau_sample(ray_session, tmp_path):
    """Issue 16 item 1: the plateau space once sampled update_frequency 1/5/10 and failed trials."""
    from ray_metaopt.tune import metaopt_trainable, trainable_with_resources

    grid = tune.Tuner(
        trainable_with_resources({"cpu": 1}),
        param_space={
            "task": "teacher_student",
            "meta": "plateau",
            "max_steps": 20,
            "eval_interval": 10,
            "meta_config": meta_search_space("plateau"),
        },
        tune_config=tune.TuneConfig(
            metric="val_loss", mode="min", num_samples=6, search_alg=BasicVariantGenerator(random_state=3)
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="plateau_space", verbose=0),
    ).fit()
    assert grid.num_errors == 0 and len(grid) == 6
    assert all(r.metrics["step"] == 20 for r in grid)
    assert metaopt_trainable is not None


def test_rl_space_with_a_shared_policy_leaves_policy_keys_to_the_actor():
    from ray_metaopt.tune.search_space import RL_POLICY_KEYS

    local = meta_search_space("rl")
    assert set(RL_POLICY_KEYS) <= set(local)
    shared = meta_search_space("rl", shared_policy="policy", policy_lr=1e-3)
    assert shared["shared_policy"] == "policy" and shared["policy_lr"] == 1e-3
    assert not (set(RL_POLICY_KEYS) - {"policy_lr"}) & set(shared)
    assert "update_frequency" in shared
    for seed in range(20):
        config = sample_meta_config(shared, seed=seed)
        meta = RLMetaOptimizer(**config)  # built without an actor: it connects at its first decision
        assert meta.shared_policy == "policy"
