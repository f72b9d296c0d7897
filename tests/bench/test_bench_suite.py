"""A tiny configuration of the whole suite, end to end on the real session Ray."""

from __future__ import annotations

import collections
import math
import os

import pytest

from ray_metaopt.bench import load_results, main, save_results, write_report
from ray_metaopt.bench.analysis import analyze
from ray_metaopt.bench.arms import RL_BASE_ARM, RL_NEAR_FACTORS, SUITE_SIZES, arms_for, lrs_for
from ray_metaopt.bench.runner import run_suite, tuned_lr
from ray_metaopt.bench.stats import mean_lr_factors

TINY = SUITE_SIZES["quick"].with_(
    name="tiny",
    tasks=("teacher_student", "moe"),
    task_configs={"teacher_student": {"val_size": 256}, "moe": {"val_size": 256}},
    max_steps={"teacher_student": 40, "moe": 20},
    eval_interval=10,
    seeds=(0,),
    lr_grid=(1e-3, 1e-2),
    default_lr_index=1,
    sweep_tasks=("teacher_student",),
    pbt_tasks=("teacher_student",),
    pbt_populations=(2,),
    pbt_seeds=(0,),
    pbt_perturbation_evals=1,
    rl_tasks=("teacher_student",),
    rl_train_seeds=(100, 101),
    rl_update_every=5,
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def suite(ray_session, tmp_path_factory):
    lines: list[str] = []
    run = run_suite(TINY, storage_path=str(tmp_path_factory.mktemp("tune")), progress=lines.append)
    return run, lines


@pytest.mark.ray
@pytest.mark.slow
def test_every_planned_trial_ran_to_its_budget(suite):
    run, lines = suite
    assert [r for r in run.records if r.status != "done"] == []
    counts = collections.Counter((r.task, r.arm) for r in run.records)
    expected = {}
    for task in TINY.tasks:
        for arm in arms_for(task, TINY):
            if arm.family == "pbt":
                expected[(task, arm.name)] = arm.population * len(TINY.pbt_seeds)
            else:
                expected[(task, arm.name)] = len(lrs_for(arm, task, TINY)) * len(TINY.seeds)
    expected[("teacher_student", "rl_train")] = len(TINY.rl_train_seeds) * len(TINY.lr_grid)
    assert dict(counts) == expected
    for r in run.records:
        assert r.steps[-1] == TINY.max_steps[r.task], (r.arm, r.steps)
        if r.arm != "pbt2":  # PBT members may restore another member's checkpoint
            assert r.steps == list(range(10, TINY.max_steps[r.task] + 1, 10))
            assert r.executed == TINY.max_steps[r.task]
    assert set(run.timings) == {"main", "rl_eval", "rl_replay", "pbt2"}  # one experiment per population size
    assert any(line.startswith("phase pbt") for line in lines)


@pytest.mark.ray
@pytest.mark.slow
def test_arms_do_what_they_claim(suite):
    run, _ = suite
    by_arm = collections.defaultdict(list)
    for r in run.records:
        by_arm[(r.task, r.arm)].append(r)
    # fixed: constant lr; cosine: decays towards 0; the lr is the configured one
    for r in by_arm[("teacher_student", "fixed")]:
        assert set(r.lr_trace) == {r.lr}
    for r in by_arm[("teacher_student", "cosine")]:
        assert r.lr_trace[0] < r.lr and r.lr_trace[-1] < 1e-3 * r.lr
    # schedule-free: no lr schedule on top (its warmup is internal), and really another optimizer
    # than AdamW at the same lr; with the plateau strategy on top it is still schedule-free
    fixed = {(r.lr, r.seed): r.val_loss for r in by_arm[("teacher_student", "fixed")]}
    for name in ("schedule_free", "schedule_free_plateau"):
        runs = by_arm[("teacher_student", name)]
        assert runs, name
        assert all(fixed[(r.lr, r.seed)] != r.val_loss for r in runs), name
    for r in by_arm[("teacher_student", "schedule_free")]:
        assert set(r.lr_trace) == {r.lr}
    # lr-free: Prodigy at lr 1.0 under a cosine decay, on every task
    for task in TINY.tasks:
        runs = by_arm[(task, "lr_free")]
        assert len(runs) == len(TINY.seeds), task
        for r in runs:
            assert r.lr == 1.0 and r.lr_trace[0] < 1.0 and r.lr_trace[-1] < 1e-3
            assert math.isfinite(r.final_val_loss)
    # the shared policy learned from the training episodes, and was saved and evaluated
    stats = run.policy_stats["teacher_student"]
    assert stats["rollouts/transitions"] > 0
    # the RL arms act on the cosine base: untrained they follow it exactly, at its tuned lr
    base_lr = tuned_lr(run.records, "teacher_student")
    cosine = {r.seed: r.val_loss for r in by_arm[("teacher_student", "cosine")] if r.lr == base_lr}
    untrained = by_arm[("teacher_student", "rl_untrained")]
    assert {r.lr for r in untrained} == {base_lr} and {r.seed: r.val_loss for r in untrained} == cosine
    assert {r.lr for r in by_arm[("teacher_student", "rl_base")]} == {base_lr * f for f in RL_NEAR_FACTORS}
    # the replay schedule is the RL arm's geometric-mean multiplier trajectory, and the replay followed it
    schedule = run.replay_schedules["teacher_student"]
    rl_runs = [r for r in by_arm[("teacher_student", "rl")] if r.lr == base_lr]
    assert len(rl_runs) == len(TINY.seeds)
    assert schedule == mean_lr_factors([[tuple(c) for c in r.lr_changes] for r in rl_runs])
    expected = schedule[1:] if schedule and schedule[0][1] == 1.0 else schedule  # a leading x1 changes nothing
    for r in by_arm[("teacher_student", "rl_replay")]:
        assert [s for s, _ in r.lr_changes] == [s for s, _ in expected]
        assert [f for _, f in r.lr_changes] == pytest.approx([f for _, f in expected])
    # MoE: the no-aux-loss treatment really trains another objective than the fixed arm at that lr
    fixed_default = {r.seed: r.val_loss for r in by_arm[("moe", "fixed")] if r.lr == TINY.default_lr}
    no_aux = {r.seed: r.val_loss for r in by_arm[("moe", "moe_no_aux_loss")]}
    assert fixed_default.keys() == no_aux.keys() and fixed_default != no_aux


@pytest.mark.ray
@pytest.mark.slow
def test_report_and_plots_are_written_and_regenerated(suite, tmp_path):
    run, _ = suite
    info = {"machine": {"cpu": "test", "cores": 2, "load_average": [1.0, 1.0, 1.0]}, "command": "ray-metaopt bench tiny"}
    out = tmp_path / "bench"
    out.mkdir()
    save_results(str(out / "results.json"), run, TINY, info)
    path = write_report(str(out), run, TINY, info)
    with open(path) as f:
        text = f.read()
    results = analyze(run.records, TINY, replay_schedules=run.replay_schedules, policy_stats=run.policy_stats)
    for task, result in results.items():
        assert f"## `{task}`" in text
        for name in result.arms:
            assert f"| `{name}` |" in text, name
    assert "### RL policy on `teacher_student`" in text
    assert "### Robustness to the initial lr" in text
    assert "ray-metaopt bench tiny" in text
    pngs = sorted(p for p in os.listdir(out) if p.endswith(".png"))
    assert pngs == [
        "moe_curves.png",
        "moe_robustness.png",
        "teacher_student_curves.png",
        "teacher_student_rl_learning_curve.png",
        "teacher_student_robustness.png",
    ]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f"![{name}]({name})" in text
    # --report-only rebuilds the same tables from results.json
    loaded, size, _ = load_results(str(out / "results.json"))
    assert size == TINY and len(loaded.records) == len(run.records)
    again = tmp_path / "again"
    assert main(["--report-only", str(out / "results.json"), "--output", str(again), "--no-plots"]) == 0
    regenerated = (again / "RESULTS.md").read_text()
    table = lambda t: t[t.index("## `teacher_student`") : t.index("## `moe`")]
    assert table(regenerated).replace("\n", "") == table(text).replace("\n", "")


@pytest.mark.ray
@pytest.mark.slow
def test_a_saved_policy_is_evaluated_without_training_and_its_report_says_so(ray_session, tmp_path):
    """``--rl-policy-from``: the RL arms act with a policy file and no training episode runs (a
    transfer test). A fresh policy's file makes the frozen RL arm its base schedule exactly."""
    from ray_metaopt.rl import RLMetaOptimizer, save_policy

    policy = save_policy(str(tmp_path / "fresh.pt"), RLMetaOptimizer(**TINY.policy(), seed=5))
    size = TINY.with_(tasks=("teacher_student",), pbt_tasks=(), rl_policy_path=policy)
    run = run_suite(size, storage_path=str(tmp_path / "tune"), progress=lambda line: None)
    arms = collections.Counter(r.arm for r in run.records)
    assert arms["rl_train"] == 0 and arms["rl"] > 0
    assert [r for r in run.records if r.status != "done"] == []
    cosine = {(r.lr, r.seed): r.val_loss for r in run.records if r.arm in (RL_BASE_ARM, "rl_base")}
    for r in (r for r in run.records if r.arm == "rl"):
        assert r.val_loss == cosine[(r.lr, r.seed)], r.lr
    assert run.policy_stats["teacher_student"]["policy/source"] == policy
    text = open(write_report(str(tmp_path), run, size, {"command": "tiny transfer"}, plots=False)).read()
    assert f"Training: none in this run. The RL arms act with the policy read from `{policy}`" in text
    assert "Learning curve:" not in text


@pytest.mark.ray
@pytest.mark.slow
def test_train_policy_trains_one_policy_on_several_tasks_and_writes_its_card(ray_session, tmp_path):
    from ray_metaopt.bench.pretrain import REFERENCE_LRS, train_policy
    from ray_metaopt.rl import load_policy

    out = str(tmp_path / "tiny-policy.pt")
    card = train_policy(out, tasks=("teacher_student", "moe"), seeds=(7, 8), lr_factors=(0.5, 2.0), size=TINY,
                        command="ray-metaopt train-policy --tiny", progress=lambda line: None)
    assert card["episodes"] == 2 * 2 * 2 and card["errored_episodes"] == 0
    state = load_policy(out)  # weights_only
    assert state["version"] >= 1 and state["version"] == card["policy_stats"]["policy/version"]
    assert card["policy_stats"]["rollouts/transitions"] > 0
    assert set(card["learning_curves"]) == {"teacher_student", "moe"}
    text = (tmp_path / "tiny-policy.md").read_text()
    assert text.startswith("# Policy card: `tiny-policy`") and "ray-metaopt train-policy --tiny" in text
    assert f"`moe` {REFERENCE_LRS['moe']:g}" in text
    with pytest.raises(ValueError, match=r"tasks must be among .*got tasks=\['digits'\]"):
        train_policy(out, tasks=("digits",), size=TINY)
