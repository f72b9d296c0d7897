"""The policies that ship with the package: names, cards, loading, and clear errors."""

from __future__ import annotations

import pytest
import torch

from ray_metaopt import OptimizerWrapper
from ray_metaopt.rl import RLMetaOptimizer, load_policy, pretrained


def test_every_shipped_policy_loads_weights_only_and_has_a_card():
    names = pretrained.available()
    assert "anchored-cosine-v1" in names
    for name in names:
        path = pretrained.policy_path(name)
        torch.load(path, weights_only=True)  # plain data and tensors only
        assert load_policy(path)["version"] > 0  # trained, not a fresh policy
        card = pretrained.card(name)
        assert card.startswith(f"# Policy card: `{name}`") and "ray-metaopt train-policy" in card


def test_from_pretrained_is_frozen_by_default_and_acts_as_the_file_says():
    meta = RLMetaOptimizer.from_pretrained("anchored-cosine-v1", total_steps=100, update_frequency=10)
    assert meta.frozen
    saved = load_policy(pretrained.policy_path("anchored-cosine-v1"))
    assert list(meta.config.lr_actions) == list(saved["config"]["lr_actions"])
    for key, value in meta.learner.network.state_dict().items():
        assert torch.equal(value, saved["weights"][key]), key
    learning = RLMetaOptimizer.from_pretrained("anchored-cosine-v1", frozen=False, total_steps=100)
    assert not learning.frozen
    params = [torch.nn.Parameter(torch.ones(3))]
    wrapper = OptimizerWrapper(torch.optim.SGD(params, lr=0.1), meta)
    for step in range(30):
        wrapper.update_hyperparameters({"loss": 1.0 / (step + 1)})
        wrapper.step()
    assert all(0 < g["lr"] < float("inf") for g in wrapper.param_groups)


def test_an_unknown_name_lists_the_shipped_policies():
    with pytest.raises(ValueError, match=r"no pretrained policy named 'nope'; shipped: \['anchored-cosine-v1'"):
        RLMetaOptimizer.from_pretrained("nope")
    with pytest.raises(ValueError, match=r"no pretrained policy named 3"):
        pretrained.policy_path(3)


def test_the_rl_pretrained_strategy_is_the_shipped_policy_frozen_and_needs_no_actor():
    from ray_metaopt.cli import _uses_rl
    from ray_metaopt.registry import PresetContext, strategy_spec
    from ray_metaopt.training.run import TrainingRun

    preset = strategy_spec("rl_pretrained").preset_config(PresetContext(20, policy_name="actor"))
    assert preset == {"meta": "rl_pretrained", "meta_config": {"update_frequency": 10}}
    assert _uses_rl("rl") and not _uses_rl("rl_pretrained")  # no shared actor is started for it
    run = TrainingRun({"task": "teacher_student", "max_steps": 40, "eval_interval": 20, "schedule": "cosine", **preset})
    meta = run.wrapper.meta_optimizer
    assert isinstance(meta, RLMetaOptimizer) and meta.frozen and meta.shared_policy is None
    assert meta.total_steps == 40 and meta.update_frequency == 10
    saved = load_policy(pretrained.policy_path(pretrained.DEFAULT))["weights"]
    assert all(torch.equal(v, saved[k]) for k, v in meta.learner.network.state_dict().items())
    results = []
    run.train(lambda result, checkpoint_dir: results.append(result))
    assert [r["step"] for r in results] == [20, 40] and results[-1]["stop_reason"] == "max_steps"
