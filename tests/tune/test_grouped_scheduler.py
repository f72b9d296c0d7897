"""GroupedScheduler: independent PBT populations in one real Tune experiment never mix."""

from __future__ import annotations

import pickle

import pytest
from ray.tune.schedulers import FIFOScheduler, PopulationBasedTraining

from ray_metaopt.tune.grouped_scheduler import GroupedScheduler


class _RecordingPBT(PopulationBasedTraining):
    """PBT that records (group of the exploited trial, group of its donor) at every exploit."""

    def __init__(self, group, exploits, **kwargs):
        super().__init__(**kwargs)
        self.group = group
        self.exploits = exploits

    def _exploit(self, tune_controller, trial, trial_to_clone):
        self.exploits.append((trial.config["_population"], trial_to_clone.config["_population"], self.group))
        return super()._exploit(tune_controller, trial, trial_to_clone)


class _Trial:
    def __init__(self, trial_id, config, status="PENDING"):
        self.trial_id, self.config, self.status = trial_id, config, status


class _Controller:
    def __init__(self, trials):
        self.trials = trials
        self.search_alg = None

    def get_trials(self):
        return list(self.trials)

    def get_live_trials(self):
        return [t for t in self.trials if t.status != "TERMINATED"]


@pytest.mark.ray
@pytest.mark.slow
def test_populations_exploit_only_within_their_group(ray_session, tmp_path):
    from ray import tune

    from ray_metaopt.tune import trainable_with_resources

    exploits: list = []
    made: dict = {}

    def factory(group):
        made[group] = _RecordingPBT(
            group,
            exploits,
            time_attr="training_iteration",
            perturbation_interval=2,
            quantile_fraction=0.5,
            resample_probability=0.0,
            hyperparam_mutations={"optimizer_config": {"lr": [1e-4, 1e-3, 1e-2]}},
            synch=True,  # every member reaches each perturbation point: an exploit always happens
        )
        return made[group]

    scheduler = GroupedScheduler(factory, "_population")
    grid = tune.Tuner(
        trainable_with_resources({"cpu": 1}),
        param_space={
            "task": "teacher_student",
            "task_config": {"val_size": 256},
            "meta": "none",
            "_population": tune.grid_search(["a", "b"]),
            "optimizer_config": {"lr": tune.grid_search([1e-4, 1e-2])},
            "max_steps": 40,
            "eval_interval": 10,
            "batch_size": 32,
        },
        tune_config=tune.TuneConfig(metric="val_loss", mode="min", scheduler=scheduler, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="grouped", verbose=0),
    ).fit()
    assert not grid.errors
    assert sorted(made) == ["a", "b"]
    assert all(r.metrics["step"] == 40 for r in grid)
    # Both populations exploited, and every donor came from the exploited trial's own population.
    assert {group for _, _, group in exploits} == {"a", "b"}, exploits
    assert all(mine == donor == group for mine, donor, group in exploits), exploits


def test_each_group_sees_only_its_trials():
    seen = {}

    class Probe(FIFOScheduler):
        def __init__(self, group):
            super().__init__()
            self.group = group

        def on_trial_add(self, tune_controller, trial):
            seen[self.group] = [t.trial_id for t in tune_controller.get_trials()]

    trials = [_Trial("1", {"g": {"k": 0}}), _Trial("2", {"g": {"k": 1}}), _Trial("3", {"g": {"k": 0}})]
    controller = _Controller(trials)
    scheduler = GroupedScheduler(Probe, "g/k")
    for trial in trials:
        scheduler.on_trial_add(controller, trial)
    assert seen == {0: ["1", "3"], 1: ["2"]}
    assert list(scheduler.schedulers) == [0, 1]
    # The first group with a pending trial runs first: a population trains together.
    trials[0].status = "RUNNING"
    assert scheduler.choose_trial_to_run(controller).trial_id == "3"
    trials[2].status = "RUNNING"
    assert scheduler.choose_trial_to_run(controller).trial_id == "2"
    assert "2 groups" in scheduler.debug_string()


def test_search_properties_reach_groups_made_later():
    class Probe(FIFOScheduler):
        def set_search_properties(self, metric, mode, **spec):
            self.props = (metric, mode)
            return True

    scheduler = GroupedScheduler(lambda g: Probe(), lambda c: c["seed"])
    assert scheduler.set_search_properties("val_loss", "min")
    scheduler.on_trial_add(_Controller([]), _Trial("1", {"seed": 3}))
    assert scheduler.schedulers[3].props == ("val_loss", "min")
    assert not scheduler.set_search_properties("loss", None)  # set once, as Tune's own schedulers


def test_pickles_like_tuner_stores_it():
    from ray import cloudpickle

    scheduler = GroupedScheduler(lambda g: FIFOScheduler(), "seed")
    scheduler.on_trial_add(_Controller([]), _Trial("1", {"seed": 0}))
    for dumps, loads in ((cloudpickle.dumps, pickle.loads),):
        copy = loads(dumps(scheduler))
        assert list(copy.schedulers) == [0] and copy.group_of == "seed"


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("not callable", "seed"), TypeError, "factory must be callable.*'not callable'"),
        ((FIFOScheduler, ""), ValueError, "group_of must name a config key.*''"),
        ((FIFOScheduler, "a//b"), ValueError, "group_of must name a config key.*'a//b'"),
        ((FIFOScheduler, 3), TypeError, "group_of must be a config key or a callable.*3"),
    ],
)
def test_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        GroupedScheduler(*args)


def test_a_trial_without_the_group_key_is_refused_and_changes_nothing():
    scheduler = GroupedScheduler(lambda g: FIFOScheduler(), "seed")
    with pytest.raises(ValueError, match="no 'seed' .*keys: \\['lr'\\]"):
        scheduler.on_trial_add(_Controller([]), _Trial("1", {"lr": 0.1}))
    assert scheduler.schedulers == {} and scheduler._members == {}


def test_a_factory_that_returns_no_scheduler_is_refused():
    scheduler = GroupedScheduler(lambda g: "pbt", "seed")
    with pytest.raises(TypeError, match="factory\\(0\\) must return a TrialScheduler, got 'pbt'"):
        scheduler.on_trial_add(_Controller([]), _Trial("1", {"seed": 0}))
    assert scheduler.schedulers == {} and scheduler._members == {}
