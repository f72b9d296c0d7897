"""The strategy registry: one registration reaches the trainable, the CLI, search spaces and the benchmark."""

from __future__ import annotations

import pytest
from ray import tune
from ray.tune.search.sample import Domain

from ray_metaopt import HParamUpdate, MetaOptimizer, PlateauMetaOptimizer, StrategySpec, register_strategy
from ray_metaopt.registry import (
    PresetContext,
    default_monitor,
    preset_strategies,
    resolve_strategy,
    strategy_names,
    strategy_spec,
    unregister_strategy,
)


class HalveOnRise(MetaOptimizer):
    """Toy strategy: halve every group's lr when the monitored metric rose since the last decision."""

    _state_attrs = ("last",)

    def __init__(self, monitor: str = "loss", factor: float = 0.5, **base):
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got factor={factor!r}")
        self.monitor, self.factor = monitor, factor
        super().__init__(**base)
        self.reset()

    def _init_state(self) -> None:
        self.last = None

    def decide(self, metrics, step, groups):
        value = float(metrics[self.monitor])
        rose = self.last is not None and value > self.last
        self.last = value
        return [HParamUpdate(g.index, "lr", g.lr * self.factor, "rose") for g in groups] if rose else []


def _toy_space() -> dict:
    return {"factor": tune.uniform(0.2, 0.8)}


@pytest.fixture
def toy():
    spec = register_strategy(
        "halve_on_rise",
        HalveOnRise,
        summary="HalveOnRise: lr x factor when val_loss rose",
        monitor="val_loss",
        search_space=_toy_space,
        preset=lambda ctx: {"meta_config": {"factor": 0.5}},
    )
    yield spec
    unregister_strategy("halve_on_rise")


def test_builtins_are_registered_with_their_monitor_and_family():
    assert strategy_names()[:6] == ["none", "plateau", "advanced_plateau", "expert_gate", "smart_expert_gate", "rl"]
    assert default_monitor("plateau") == default_monitor("advanced_plateau") == "val_loss"
    assert default_monitor("expert_gate") is None and default_monitor("rl") is None
    assert default_monitor("ray_metaopt.plateau:PlateauMetaOptimizer") == "val_loss"  # a path finds its spec
    assert default_monitor(PlateauMetaOptimizer) == "val_loss"  # and so does the class
    assert [s.name for s in preset_strategies(family="heuristic", task="teacher_student")] == [
        "plateau",
        "advanced_plateau",
    ]
    assert resolve_strategy("plateau") == ("plateau", PlateauMetaOptimizer)


def test_a_registered_strategy_reaches_the_trainable(toy):
    from ray_metaopt.tune import TrainingRun, available_strategies
    from ray_metaopt.training.builders import trial_meta_defaults

    assert "halve_on_rise" in available_strategies()
    assert trial_meta_defaults("halve_on_rise", 10) == {
        "update_frequency": 10, "metric_window": 1, "monitor": "val_loss"}
    config = {"task": "teacher_student", "meta": "halve_on_rise", "max_steps": 60, "eval_interval": 10,
              "optimizer_config": {"lr": 0.3}, "seed": 0}
    run = TrainingRun(config)
    meta = run.wrapper.meta_optimizer
    assert isinstance(meta, HalveOnRise) and meta.monitor == "val_loss" and meta.update_frequency == 10
    results = []
    run.train(lambda metrics, checkpoint_dir: results.append(metrics))
    assert [r["step"] for r in results] == [10, 20, 30, 40, 50, 60]
    assert meta.last is not None  # it saw val_loss (a KeyError in decide would have failed the run)
    assert all((d.step + 1) % 10 == 0 for d in run.wrapper.decisions)  # only at evaluations


def test_a_registered_strategy_reaches_the_search_spaces(toy):
    from ray_metaopt.tune import meta_search_space, meta_search_space_names
    from ray_metaopt.tune.search_space import sample_meta_config

    assert "halve_on_rise" in meta_search_space_names()
    space = meta_search_space("halve_on_rise", eval_interval=10)
    assert isinstance(space["factor"], Domain)
    # it watches val_loss in the trainable, so update_frequency is searched over multiples of eval_interval
    assert set(space["update_frequency"].categories) == {10, 20, 50}
    HalveOnRise(**sample_meta_config(space, seed=0))


def test_a_registered_strategy_reaches_the_cli(toy, capsys):
    from ray_metaopt.cli import STRATEGY_KEY, build_param_space, main, parse_args

    with pytest.raises(SystemExit):
        main(["--help"])
    assert "HalveOnRise: lr x factor when val_loss rose" in capsys.readouterr().out
    args = parse_args(["--strategies", "none", "halve_on_rise"])
    space = build_param_space(args, "policy")
    chosen = {STRATEGY_KEY: "halve_on_rise"}
    assert space["meta"].func(chosen) == "halve_on_rise"
    assert space["meta_config"].func(chosen) == {"factor": 0.5}


def test_a_registered_strategy_reaches_the_benchmark(toy):
    from ray_metaopt.bench.arms import SUITE_SIZES, ArmContext, arms_for, lrs_for, trial_config
    from ray_metaopt.tune import TrainingRun

    size = SUITE_SIZES["quick"]
    arm = next(a for a in arms_for("teacher_student", size) if a.name == "halve_on_rise")
    assert arm.family == "heuristic" and lrs_for(arm, "teacher_student", size) == list(size.lr_grid)
    config = trial_config(arm, ArmContext("teacher_student", size, size.default_lr, seed=0))
    assert (config["meta"], config["meta_config"]) == ("halve_on_rise", {"factor": 0.5})
    assert isinstance(TrainingRun({**config, "max_steps": 20}).wrapper.meta_optimizer, HalveOnRise)


def test_a_strategy_made_for_some_tasks_runs_only_there(toy):
    from ray_metaopt.bench.arms import SUITE_SIZES, arms_for, skipped_arms

    register_strategy("moe_only", HalveOnRise, preset=lambda ctx: {}, tasks=("moe",))
    try:
        size = SUITE_SIZES["quick"]
        assert "moe_only" in [a.name for a in arms_for("moe", size)]
        assert "moe_only" not in [a.name for a in arms_for("teacher_student", size)]
        assert "moe_only" not in dict(skipped_arms("teacher_student", size))  # not a gap there
    finally:
        unregister_strategy("moe_only")


def test_preset_context_reaches_the_preset():
    spec = strategy_spec("plateau")
    assert spec.preset_config(PresetContext(eval_interval=20, patience=7)) == {
        "meta": "plateau",
        "meta_config": {"patience": 7, "lr_factor": 0.5, "threshold": 1e-3},
    }
    advanced = strategy_spec("advanced_plateau").preset_config(PresetContext(eval_interval=20))
    assert advanced["meta_config"]["warmup_steps"] == 20 and advanced["metric_reduction"] == "mean"


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"name": "", "factory": HalveOnRise}, ValueError, "name="),
        ({"name": "a:b", "factory": HalveOnRise}, ValueError, "name='a:b'"),
        ({"name": "x", "factory": 3}, TypeError, "factory=3"),
        ({"name": "x", "factory": HalveOnRise, "monitor": ""}, ValueError, "monitor=''"),
        ({"name": "x", "factory": HalveOnRise, "search_space": {"a": 1}}, TypeError, "search_space="),
        ({"name": "x", "factory": HalveOnRise, "preset": {"a": 1}}, TypeError, "preset="),
        ({"name": "x", "factory": HalveOnRise, "tasks": "moe"}, TypeError, "tasks='moe'"),
        ({"name": "x", "factory": HalveOnRise, "family": "magic"}, ValueError, "family='magic'"),
    ],
)
def test_bad_registrations_name_the_argument_and_change_nothing(kwargs, error, words):
    before = strategy_names()
    with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[")):
        register_strategy(kwargs.pop("name"), kwargs.pop("factory"), **kwargs)
    assert strategy_names() == before


def test_a_name_is_registered_once_unless_overwritten(toy):
    with pytest.raises(ValueError, match="already registered.*overwrite=True"):
        register_strategy("halve_on_rise", HalveOnRise)
    replaced = register_strategy(StrategySpec("halve_on_rise", HalveOnRise, monitor="loss"), overwrite=True)
    assert strategy_spec("halve_on_rise") is replaced and default_monitor("halve_on_rise") == "loss"
    with pytest.raises(TypeError, match="either a StrategySpec"):
        register_strategy(replaced, HalveOnRise)
    with pytest.raises(KeyError, match="nope"):
        unregister_strategy("nope")


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ValueError, match=r"meta must be one of \['none', 'plateau'.*got meta='plato'"):
        resolve_strategy("plato")
    with pytest.raises(ValueError, match="could not be imported"):
        resolve_strategy("no_such_module:Thing")


def test_a_module_path_registers_its_strategy_on_import(tmp_path, monkeypatch):
    # What a Tune worker sees: meta="module:Class" of a module that registers itself when imported.
    (tmp_path / "my_rules_for_test.py").write_text(
        "from ray_metaopt import MetaOptimizer, register_strategy\n"
        "class Keep(MetaOptimizer):\n"
        "    def decide(self, metrics, step, groups):\n"
        "        return []\n"
        "register_strategy('keep_for_test', Keep, monitor='val_loss')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "keep_for_test" not in strategy_names()
        assert default_monitor("my_rules_for_test:Keep") == "val_loss"
        assert resolve_strategy("my_rules_for_test:Keep")[0] == "Keep"
    finally:
        if "keep_for_test" in strategy_names():
            unregister_strategy("keep_for_test")
