"""From hand-made trial records to the report's numbers and text (no Ray)."""

from __future__ import annotations

import json
import math

import pytest

from ray_metaopt.bench import load_results, main, save_results, size_from_dict, size_to_dict
from ray_metaopt.bench.analysis import analyze
from ray_metaopt.bench.arms import SUITE_SIZES, ArmContext, arms_for, lrs_for, trial_config
from ray_metaopt.bench.report import findings, headline_table, render_report
from ray_metaopt.bench.runner import SuiteRun, TrialRecord

SIZE = SUITE_SIZES["quick"].with_(
    name="hand",
    tasks=("teacher_student",),
    max_steps={"teacher_student": 40},
    eval_interval=20,
    seeds=(0, 1, 2),
    lr_grid=(1e-3, 1e-2),
    default_lr_index=1,
    sweep_tasks=("teacher_student",),
    pbt_tasks=("teacher_student",),
    pbt_populations=(2,),
    rl_tasks=("teacher_student",),
    rl_train_seeds=(100,),
    rl_paired_reference=False,
)

# (arm, lr, seed) -> (val loss at step 20, val loss at step 40); None: diverged at step 20
FINALS = {
    ("fixed", 1e-3): [(0.9, 0.50), (0.9, 0.52), (0.9, 0.54)],
    ("fixed", 1e-2): [(0.5, 0.40), (0.5, 0.42), (0.5, 0.38)],
    ("cosine", 1e-3): [(0.9, 0.45), (0.9, 0.47), (0.9, 0.46)],
    ("cosine", 1e-2): [(0.6, 0.30), (0.6, 0.33), (0.6, 0.31)],
    ("plateau", 1e-3): [(0.9, 0.28), (0.9, 0.30), (0.9, 0.29)],
    ("plateau", 1e-2): [(0.31, 0.29), (0.4, 0.35), None],
    ("rl", 1e-3): [(0.9, 0.6), (0.9, 0.6), (0.9, 0.6)],
    ("rl", 1e-2): [(0.5, 0.32), (0.5, 0.34), (0.5, 0.30)],
    # off the grid, at 0.5x and 2x the RL base's (cosine's) tuned lr 1e-2, with the base alone there
    ("rl", 5e-3): [(0.5, 0.35), (0.5, 0.36), (0.5, 0.37)],
    ("rl", 2e-2): [(0.5, 0.5), (0.5, 0.5), (0.5, 0.5)],
    ("rl_base", 5e-3): [(0.5, 0.36), (0.5, 0.37), (0.5, 0.38)],
    ("rl_base", 2e-2): [(0.5, 0.4), (0.5, 0.4), (0.5, 0.4)],
}


def _record(arm, lr, seed, vals, order=0, group="", phase="main"):
    rec = TrialRecord(arm=arm, task="teacher_student", lr=lr, seed=seed, phase=phase, trial_id=f"{arm}_{lr}_{seed}_{group}",
                      group=group, eval_interval=20, order=order)
    if vals is None:
        rec.steps, rec.val_loss, rec.train_loss, rec.lr_trace = [20], [math.nan], [math.nan], [lr or 0.1]
        rec.status, rec.executed = "diverged", 20
    else:
        rec.steps, rec.val_loss, rec.train_loss, rec.lr_trace = [20, 40], list(vals), [1.0, 0.5], [lr or 0.1] * 2
        rec.status, rec.executed = "done", 40
    return rec


def _records():
    records = []
    for (arm, lr), per_seed in FINALS.items():
        for seed, vals in enumerate(per_seed):
            records.append(_record(arm, lr, seed, vals))
    # PBT, population 2: per seed the best member counts, the cost is both members' steps
    for seed, (a, b) in enumerate([(0.35, 0.28), (0.31, 0.5), (0.29, None)]):
        records.append(_record("pbt2", None, seed, (0.5, a), group=f"pbt2/{seed}"))
        records.append(_record("pbt2", None, seed, None if b is None else (0.5, b), group=f"pbt2/{seed}"))
    # two training episodes, the second better: returns log(1/0.5) + log(0.8/0.6), log(2) + log(0.8/0.4)
    records.append(_record("rl_train", 1e-3, 100, (0.8, 0.6), order=0, phase="rl_train"))
    records.append(_record("rl_train", 1e-2, 100, (0.8, 0.4), order=1, phase="rl_train"))
    return records


@pytest.fixture(scope="module")
def result():
    return analyze(_records(), SIZE)["teacher_student"]


def test_tuned_arms_report_the_grids_best_lr_and_cost_the_whole_grid(result):
    fixed, cosine = result.arms["fixed"], result.arms["cosine"]
    assert fixed.headline_lr == 1e-2 and cosine.headline_lr == 1e-2
    assert fixed.finals == {0: 0.40, 1: 0.42, 2: 0.38}
    assert cosine.summary.median == 0.31
    assert (fixed.cost_trials, fixed.cost_steps) == (2, 80)  # two grid lrs x 40 steps
    assert result.target == 0.31  # the tuned cosine median


def test_adaptive_arm_reports_the_default_lr_and_counts_divergence(result):
    plateau = result.arms["plateau"]
    assert plateau.headline_lr == 1e-2
    assert plateau.finals == {0: 0.29, 1: 0.35, 2: math.inf}
    assert plateau.summary.median == 0.35 and plateau.summary.num_inf == 1
    assert (plateau.num_diverged, plateau.num_trials, plateau.divergence_rate) == (1, 6, pytest.approx(1 / 6))
    # vs cosine (0.30, 0.33, 0.31): lower on seed 0, higher on 1 and 2 (diverged)
    c = plateau.vs_cosine
    assert (c.wins, c.losses, c.ties) == (1, 2, 0)
    assert (plateau.cost_trials, plateau.cost_steps) == (1, 40)
    # vs a constant lr of 1e-2 (0.40, 0.42, 0.38): lower on seeds 0 and 1, diverged on 2
    same = plateau.vs_fixed_same_lr
    assert (same.wins, same.losses, same.ties) == (2, 1, 0)
    assert result.arms["pbt2"].vs_fixed_same_lr is None and result.arms["fixed"].vs_fixed_same_lr is None
    # target 0.31: seed 0 reached it at its first evaluation (0.31 <= 0.31), seed 1 never, seed 2 diverged
    assert plateau.steps_to_target == {0: 20, 1: None, 2: None}
    assert plateau.median_steps_to_target == math.inf and plateau.target_reached == 1


def test_swept_arm_also_reported_at_its_best_lr_costing_the_grid(result):
    tuned = result.arms["plateau_tuned"]
    assert tuned.headline_lr == 1e-3 and tuned.finals == {0: 0.28, 1: 0.30, 2: 0.29}
    assert (tuned.cost_trials, tuned.cost_steps) == (2, 80)
    assert (tuned.vs_cosine.wins, tuned.vs_cosine.losses) == (3, 0)
    assert tuned.robustness is None  # its robustness is the plateau row's
    assert "rl_tuned" not in result.arms  # the RL arm is reported at its base's tuned lr already


def test_rl_arm_and_controls_report_at_their_base_schedules_tuned_lr(result):
    assert result.rl.base_arm == "cosine" and result.rl.base_lr == 1e-2
    rl = result.arms["rl"]
    assert rl.headline_lr == 1e-2 and rl.finals == {0: 0.32, 1: 0.34, 2: 0.30}
    # robustness over the grid only (the two off-grid lrs are for the comparison with the base)
    assert set(rl.robustness.medians) == {1e-3, 1e-2}
    assert "rl_base" not in result.arms  # a reference inside the RL section, not a row


def test_robustness_over_the_grid(result):
    rob = result.arms["plateau"].robustness
    assert rob.medians == {1e-3: 0.29, 1e-2: 0.35}
    assert rob.worst == 0.35
    assert result.best_overall == 0.29
    assert rob.worst_over_best == pytest.approx(0.35 / 0.29)
    assert result.arms["fixed"].robustness.worst == 0.52


def test_pbt_takes_each_seeds_best_member_and_costs_the_population(result):
    pbt = result.arms["pbt2"]
    assert pbt.finals == {0: 0.28, 1: 0.31, 2: 0.29}
    assert (pbt.cost_trials, pbt.cost_steps) == (2, 80)  # seed 2: 40 + 20 (diverged) -> median over seeds 80
    assert pbt.num_diverged == 1
    assert pbt.headline_lr is None


def test_rl_counts_its_training_episodes_and_learning_curve(result):
    rl = result.arms["rl"]
    assert rl.one_time_steps == 80  # two training episodes of 40 steps
    assert result.rl.returns == pytest.approx([math.log(2) + math.log(0.8 / 0.6), math.log(2) + math.log(2)])
    # advantage = return - the base schedule's (cosine's) return at that lr; the training losses are equal
    base_val = {1e-3: [0.45, 0.47, 0.46], 1e-2: [0.30, 0.33, 0.31]}
    first_val = {1e-3: 0.9, 1e-2: 0.6}
    base = {lr: sum(math.log(first_val[lr] / v) for v in vs) / 3 for lr, vs in base_val.items()}
    expected = [math.log(0.8 / 0.6) - base[1e-3], math.log(0.8 / 0.4) - base[1e-2]]
    assert result.rl.advantages == pytest.approx(expected)
    assert result.rl.first_round_mean == pytest.approx(sum(expected) / 2)  # one round: first == last
    assert result.rl.last_round_mean == result.rl.first_round_mean
    vs_base = result.rl.vs_base_by_lr
    assert sorted(vs_base) == [1e-3, 5e-3, 1e-2, 2e-2]
    assert (vs_base[1e-2].wins, vs_base[1e-2].losses) == (1, 2)  # 0.32/0.34/0.30 vs cosine 0.30/0.33/0.31
    assert (vs_base[1e-3].wins, vs_base[1e-3].losses) == (0, 3)
    assert (vs_base[5e-3].wins, vs_base[5e-3].losses) == (3, 0)  # vs the `rl_base` runs off the grid
    assert (vs_base[2e-2].wins, vs_base[2e-2].losses) == (0, 3)


def test_paired_reference_training_counts_each_episodes_reference_run():
    paired = analyze(_records(), SIZE.with_(rl_paired_reference=True))["teacher_student"]
    assert paired.arms["rl"].one_time_steps == 160  # two episodes of 40 steps, each after its 40-step reference


def test_rl_reward_flag_sets_the_sizes_paired_reference():
    from ray_metaopt.bench import _parse

    assert _parse(["--quick", "--rl-reward", "paired"])[1].rl_paired_reference is True
    assert _parse(["--quick", "--rl-reward", "own"])[1].rl_paired_reference is False


def test_stratified_training_lrs_cover_the_grids_range_one_per_stratum():
    import math

    from ray_metaopt.bench import _parse

    size = _parse(["--quick", "--rl-train-lrs", "stratified"])[1]
    assert size.rl_train_lrs == "stratified" and _parse(["--quick"])[1].train_lrs(100) == list(size.lr_grid)
    low, high = math.log10(min(size.lr_grid)), math.log10(max(size.lr_grid))
    width = (high - low) / len(size.lr_grid)
    for seed in size.rl_train_seeds:
        lrs = size.train_lrs(seed)
        assert lrs == size.train_lrs(seed)  # the same draw in every run
        assert [int((math.log10(lr) - low) // width) for lr in lrs] == list(range(len(size.lr_grid)))
    assert size.train_lrs(100) != size.train_lrs(101)  # each seed its own draw
    assert size_from_dict(size_to_dict(size)).train_lrs(100) == size.train_lrs(100)
    with pytest.raises(
        ValueError, match="rl_train_lrs must be one of \\['grid', 'stratified', 'dense', 'reference'\\], got rl_train_lrs='uniform'"
    ):
        size.with_(rl_train_lrs="uniform")


def test_dense_training_lrs_are_the_grid_and_its_geometric_midpoints_for_every_seed():
    import math

    from ray_metaopt.bench import _parse, planned_trials
    from types import SimpleNamespace

    from ray_metaopt.bench.report import _training_lrs

    size = _parse(["--quick", "--rl-train-lrs", "dense"])[1]
    grid = sorted(size.lr_grid)
    lrs = size.train_lrs(100)
    assert lrs == size.train_lrs(101) and len(lrs) == 2 * len(grid) - 1
    assert lrs[::2] == grid
    for low, mid, high in zip(lrs[::2], lrs[1::2], lrs[2::2]):
        assert math.isclose(math.log(mid), (math.log(low) + math.log(high)) / 2)
    grid_size = size.with_(rl_train_lrs="grid")
    extra = len(size.rl_train_seeds) * (len(grid) - 1) * len([t for t in size.tasks if t in size.rl_tasks])
    assert planned_trials(size) == planned_trials(grid_size) + extra
    def rl(episode_lrs):  # what _training_lrs reads of the RL data: the episodes' initial lrs
        return SimpleNamespace(episodes=[SimpleNamespace(lr=lr) for lr in episode_lrs])

    assert "midpoint" in _training_lrs(rl(lrs), grid)
    assert _training_lrs(rl(grid), grid) == "every lr of the grid"
    assert "distinct" in _training_lrs(rl(size.with_(rl_train_lrs="stratified").train_lrs(100)), grid)


def test_rl_policy_flag_overrides_the_policy_of_every_rl_arm():
    from ray_metaopt.bench import _parse
    from ray_metaopt.bench.arms import RL_POLICY, ArmContext, rl_arm_config

    size = _parse(["--quick", "--rl-policy", "gamma=1.0", "return_horizon=100"])[1]
    assert size.policy() == {**RL_POLICY, "gamma": 1.0, "return_horizon": 100}
    config = rl_arm_config(ArmContext("teacher_student", size, 1e-2, 0))
    assert config["meta_config"]["gamma"] == 1.0 and config["meta_config"]["return_horizon"] == 100
    assert size_from_dict(size_to_dict(size)).policy() == size.policy()


def test_findings_state_winners_and_losers(result):
    text = "\n".join(findings(result))
    assert "Lowest median final validation loss: `plateau_tuned` (0.29)" in text
    assert "highest: `fixed` (0.4)" in text
    assert "Better than the tuned cosine schedule on most seeds: `plateau_tuned`, `pbt2`." in text
    # rl: 0.32/0.34/0.30 vs 0.30/0.33/0.31
    assert "Worse on most seeds: `fixed`, `plateau`, `rl`." in text
    assert "`plateau` 1/6 trials" in text and "`pbt2` 1/6 trials" in text


def test_headline_table_has_one_row_per_arm_sorted_by_median(result):
    table = headline_table(result).splitlines()
    names = [line.split("|")[1].strip().strip("`") for line in table[2:]]
    assert names == ["plateau_tuned", "pbt2", "cosine", "rl", "plateau", "fixed"]
    assert "0.35 [0.32, diverged] (n=3)" in table[6]  # plateau's median and quartiles


def test_report_renders_every_section(result):
    run_results = {"teacher_student": result}
    text = render_report(
        run_results, SIZE, machine={"cpu": "test CPU", "cores": 2, "torch": "x", "ray": "y", "load_average": [3.0, 2.0, 1.0]},
        command="ray-metaopt bench --quick", wall_seconds=120.0, timings={"main": 100.0},
    )
    for needle in ("## Machine", "test CPU", "Load average", "## Setup", "### Arms", "## `teacher_student`",
                   "### Robustness to the initial lr", "### RL policy on `teacher_student`", "### Findings",
                   "`ray-metaopt bench --quick`", "main 100s"):
        assert needle in text, needle


def test_results_json_round_trip_and_report_only(tmp_path):
    records = _records()
    run = SuiteRun(records, {"main": 1.0}, {}, {}, ["a note"], 60.0)
    path = tmp_path / "results.json"
    save_results(str(path), run, SIZE, {"machine": {"cpu": "c"}, "command": "ray-metaopt bench --quick"})
    json.loads(path.read_text())  # standard JSON (inf/nan written as strings)
    loaded, size, _ = load_results(str(path))
    assert size == SIZE and size_from_dict(size_to_dict(SIZE)) == SIZE
    assert [r.to_dict() for r in loaded.records] == [r.to_dict() for r in records]
    assert math.isnan(loaded.records[[r.status for r in records].index("diverged")].val_loss[0])
    assert main(["--report-only", str(path), "--output", str(tmp_path / "out"), "--no-plots"]) == 0
    text = (tmp_path / "out" / "RESULTS.md").read_text()
    assert "a note" in text and "ray-metaopt bench --quick" in text
    # the console command dispatches `bench` here
    from ray_metaopt.cli import main as cli_main

    assert cli_main(["bench", "--report-only", str(path), "--output", str(tmp_path / "cli"), "--no-plots"]) == 0
    again = (tmp_path / "cli" / "RESULTS.md").read_text()
    body = lambda t: t[t.index("## Machine") :]
    assert body(again) == body(text)
    # without --output the report goes beside its results file, not over ./benchmarks/RESULTS.md
    assert main(["--report-only", str(path), "--no-plots"]) == 0
    assert body((tmp_path / "RESULTS.md").read_text()) == body(text)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quick", "--tasks", "nope"], "not in the quick size's tasks"),
        (["--quick", "--seeds", "0"], "--seeds must be >= 1"),
        (["--quick", "--first-seed", "-1"], "--first-seed must be >= 0, got -1"),
        (["--quick", "--first-seed", "98"], "overlap the RL training seeds at [100, 101, 102]"),
        (["--quick", "--cpus-per-trial", "0"], "--cpus-per-trial must be > 0"),
        (["--num-cpus", "2", "--address", "auto"], "cannot be used with --address"),
        (["--quick", "--rl-policy", "gama=1"], "--rl-policy takes KEY=VALUE with KEY an RLMetaOptimizer argument, got 'gama=1'"),
    ],
)
def test_bad_arguments_exit_with_status_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_an_episode_with_a_paired_reference_is_scored_against_it():
    """An episode that carries its paired reference's curves gets the paired advantage (its
    return minus the reference's), not the evaluation seeds' base return at its lr; the others
    keep the unpaired one, and the report says which."""
    records = _records()
    episode = next(r for r in records if r.phase == "rl_train" and r.lr == 1e-3)
    episode.reference_train_loss, episode.reference_val_loss = [1.0, 0.5], [0.8, 0.7]
    rl = analyze(records, SIZE)["teacher_student"].rl
    assert rl.paired_episodes == 1
    assert rl.advantages[0] == pytest.approx(math.log(0.7 / 0.6))  # equal training curves: the val terms
    base = sum(math.log(0.6 / v) for v in (0.30, 0.33, 0.31)) / 3
    assert rl.advantages[1] == pytest.approx(math.log(0.8 / 0.4) - base)
    episode.reference_val_loss = [0.8, math.nan]  # an incomplete reference is not used
    assert analyze(records, SIZE)["teacher_student"].rl.paired_episodes == 0
    round_trip = TrialRecord.from_dict(episode.to_dict())
    assert round_trip.reference_train_loss == [1.0, 0.5] and math.isnan(round_trip.reference_val_loss[1])


def test_first_seed_moves_the_evaluation_seeds():
    from ray_metaopt.bench import _parse

    _, size = _parse(["--quick", "--first-seed", "200"])
    assert size.seeds == (200, 201, 202, 203, 204)
    _, size = _parse(["--quick", "--first-seed", "200", "--seeds", "2"])
    assert size.seeds == (200, 201)
    _, size = _parse(["--quick", "--seeds", "3"])
    assert size.seeds == (0, 1, 2)
    _, size = _parse(["--quick", "--no-pbt"])
    assert size.pbt_tasks == () and not any(a.family == "pbt" for t in size.tasks for a in arms_for(t, size))


def test_rl_lr_plans_follow_the_base_schedules_tuned_lr():
    from ray_metaopt.bench.arms import RL_BASE_SCHEDULE, arm_named

    size = SUITE_SIZES["quick"]
    tuned = size.lr_grid[3]
    rl, untrained, base = (arm_named(n) for n in ("rl", "rl_untrained", "rl_base"))
    assert lrs_for(rl, "mnist1d", size, tuned) == [*size.lr_grid, tuned * 0.5, tuned * 2.0]
    assert lrs_for(untrained, "mnist1d", size, tuned) == [tuned]
    assert lrs_for(base, "mnist1d", size, tuned) == [tuned * 0.5, tuned * 2.0]
    # on a grid of factor-2 steps the near lrs are grid lrs: they are not run twice
    doubling = size.with_(lr_grid=(1e-3, 2e-3, 4e-3), default_lr_index=1)
    assert lrs_for(base, "mnist1d", doubling, 2e-3) == []
    assert lrs_for(rl, "mnist1d", doubling, 2e-3) == [1e-3, 2e-3, 4e-3]
    for arm in (rl, untrained, arm_named("rl_replay")):
        assert trial_config(arm, ArmContext("mnist1d", size, tuned, 0))["schedule"] == RL_BASE_SCHEDULE


def test_every_arm_builds_a_valid_trial_config():
    """Each arm's config passes the trainable's own validation and builds its strategy."""
    from ray_metaopt.tune import resolve_config
    from ray_metaopt.training.builders import build_meta_optimizer

    size = SUITE_SIZES["quick"]
    for task in size.tasks:
        for arm in arms_for(task, size):
            for lr in lrs_for(arm, task, size):
                ctx = ArmContext(task, size, lr, 0, policy_path=None, replay_schedule=[[10, 0.5]])
                config = trial_config(arm, ctx)
                resolved = resolve_config(config)
                if arm.name in ("rl", "rl_state_blind"):
                    continue  # need a saved policy file; covered by the Ray end-to-end test
                meta_config = dict(resolved.meta_config)
                build_meta_optimizer(resolved.meta, meta_config, total_steps=resolved.max_steps, seed=0,
                                     defaults={"update_frequency": resolved.eval_interval})



def test_a_tasks_batch_size_override_reaches_its_trials_only():
    size = SUITE_SIZES["quick"]
    fixed = next(a for a in arms_for("charlm", size) if a.name == "fixed")
    assert trial_config(fixed, ArmContext("charlm", size, 1e-3, 0))["batch_size"] == size.batch_sizes["charlm"] == 32
    assert trial_config(fixed, ArmContext("mnist1d", size, 1e-3, 0))["batch_size"] == size.batch_size == 64
    with pytest.raises(ValueError, match=r"batch_sizes\['charlm'\] must be .*0"):
        size.with_(batch_sizes={"charlm": 0})

def test_rl_policy_from_reads_the_files_settings_and_rejects_a_bad_file_before_any_trial(tmp_path, capsys):
    from ray_metaopt.bench import _parse, planned_trials
    from ray_metaopt.rl import RLMetaOptimizer, save_policy

    path = save_policy(str(tmp_path / "p.pt"), RLMetaOptimizer(hidden_size=8, lr_actions=[0.5, 1.0, 2.0], seed=1))
    size = _parse(["--quick", "--rl-policy-from", path, "--rl-tasks", "moe", "mnist1d"])[1]
    assert size.rl_policy_path == path and size.rl_tasks == ("moe", "mnist1d")
    assert size.policy()["hidden_size"] == 8 and "seed" not in size.rl_policy
    trained = _parse(["--quick", "--rl-tasks", "moe", "mnist1d"])[1]
    assert planned_trials(size) == planned_trials(trained) - 2 * sum(len(trained.train_lrs(s)) for s in trained.rl_train_seeds)
    (tmp_path / "junk.pt").write_bytes(b"not a policy")
    for argv, message in [
        (["--rl-policy-from", str(tmp_path / "junk.pt")], f"--rl-policy-from {str(tmp_path / 'junk.pt')!r}: "),
        (["--rl-policy-from", str(tmp_path / "missing.pt")], "no policy file at"),
        (["--rl-policy-from", path, "--rl-policy", "gamma=0.5"], "--rl-policy cannot change a policy read with --rl-policy-from"),
        (["--rl-tasks", "digits"], "--rl-tasks ['digits'] not among the tasks run"),
    ]:
        with pytest.raises(SystemExit):
            _parse(["--quick", *argv])
        assert message in capsys.readouterr().err, argv


def test_reference_training_lrs_spread_around_each_tasks_tuned_lr():
    from ray_metaopt.bench import _parse
    from ray_metaopt.bench.arms import REFERENCE_LRS

    size = _parse(["--quick", "--rl-train-lrs", "reference"])[1]
    lrs = size.train_lrs(100, "mnist1d")
    assert lrs == pytest.approx([REFERENCE_LRS["mnist1d"] * f for f in (0.3, 0.55, 1.0, 1.8, 3.0)])
    assert size.train_lrs(101, "mnist1d") == lrs and size.train_lrs(100, "charlm") != lrs
    with pytest.raises(ValueError, match="rl_train_lrs='reference' knows the tuned lr of .* got rl_tasks \\['sequence', 'digits', 'digits_cnn'\\]"):
        SUITE_SIZES["full"].with_(rl_train_lrs="reference")
