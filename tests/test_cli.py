"""The ``ray-metaopt`` command: argument errors, ``--help``, ``bench``, the plot fallback, and a
real ``--smoke`` run (its own local Ray, in a subprocess) that prints the table and writes the PNG."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from ray_metaopt.cli import DEFAULT_STRATEGIES, STRATEGIES, STRATEGY_KEY, build_param_space, format_table, main, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_options_strategies_and_bench(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--address",
        "--smoke",
        "--task",
        "--strategies",
        "--num-samples",
        "--max-steps",
        "--storage-path",
        "--output",
    ):
        assert option in out
    for name in STRATEGIES:
        assert name in out
    assert "bench" in out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--strategies", "none", "plato"], "unknown strategy 'plato'; choose from: none, cosine, plateau"),
        (["--strategies", "plateau,rll"], "unknown strategy 'rll'"),
        (["--task", "mnist"], "unknown task 'mnist'; choose from: "),
        (["--optimizer", "adamm"], "unknown optimizer 'adamm'; choose from: "),
        (["--strategies", "expert_gate"], "strategy 'expert_gate' needs --task moe"),
        (["--max-steps", "0"], "--max-steps must be >= 1, got 0"),
        (["--max-steps", "10", "--eval-interval", "20"], "--eval-interval (20) must be <= --max-steps (10)"),
        (["--lr", "nan"], "--lr must be a positive finite number"),
        (["--num-cpus", "2", "--address", "auto"], "--num-cpus sizes the local Ray"),
    ],
)
def test_bad_arguments_fail_with_the_choices(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err
    if "unknown task" in words:
        assert "teacher_student" in err and "digits" in err


def test_strategy_choices_are_the_full_list(capsys):
    with pytest.raises(SystemExit):
        main(["--strategies", "bogus"])
    err = capsys.readouterr().err
    assert err.strip().endswith(", ".join(STRATEGIES))


def test_defaults_and_smoke_sizes():
    args = parse_args([])
    assert args.strategy_names == list(DEFAULT_STRATEGIES)
    assert (args.max_steps, args.eval_interval, args.task, args.address) == (
        1500,
        50,
        "teacher_student",
        None,
    )
    assert args.output == "./ray_metaopt_results" and args.num_samples == 2
    smoke = parse_args(["--smoke", "--strategies", "none", "plateau,rl", "plateau"])
    assert smoke.strategy_names == ["none", "plateau", "rl"]  # comma/space separated, deduplicated
    assert (smoke.max_steps, smoke.eval_interval, smoke.num_samples) == (60, 10, 1)


@pytest.mark.parametrize("argv, base", [([], "cosine"), (["--rl-base", "constant"], "constant")])
def test_rl_strategy_acts_on_its_base_schedule(argv, base):
    space = build_param_space(parse_args(argv), "policy")
    schedule = space["schedule"].func
    assert schedule({STRATEGY_KEY: "rl"}) == base
    assert schedule({STRATEGY_KEY: "cosine"}) == "cosine" and schedule({STRATEGY_KEY: "none"}) == "constant"


def test_bench_dispatches_to_the_benchmark_suite(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out  # the bench suite's own options, not the comparison's


def test_run_subcommand_is_the_main_job(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--strategies" in out and "--quick" not in out  # the comparison's options
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--strategies", "no_such_strategy"])
    assert exit_info.value.code == 2 and "unknown strategy 'no_such_strategy'" in capsys.readouterr().err


def test_table_formats_missing_values():
    rows = [
        {
            "strategy": "none",
            "seed": 0,
            "status": "done",
            "steps": 60,
            "final_val_loss": 0.0123456,
            "best_val_loss": 0.01,
            "final_lr": 0.01,
            "decisions": 0,
            "steps_per_second": 321.0,
        },
        {
            "strategy": "rl",
            "seed": 0,
            "status": "ERROR",
            "steps": None,
            "final_val_loss": None,
            "best_val_loss": None,
            "final_lr": None,
            "decisions": None,
            "steps_per_second": None,
        },
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split()[:3] == ["strategy", "seed", "status"]
    assert lines[2].split() == ["none", "0", "done", "60", "0.01235", "0.01", "0.01", "0", "321.0"]
    assert lines[3].split() == ["rl", "0", "ERROR", "-", "-", "-", "-", "-", "-"]


def test_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    from ray_metaopt.tune.plotting import MissingPlotDependency, plot_trajectories

    for module in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, module, None)  # what "not installed" looks like to import
    with pytest.raises(MissingPlotDependency, match=r'pip install "ray_metaopt\[plot\]"'):
        plot_trajectories([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_smoke_run_prints_table_and_writes_png(tmp_path):
    out = tmp_path / "results"
    argv = [
        "--smoke",
        "--num-cpus",
        "2",
        "--strategies",
        "none",
        "cosine",
        "plateau",
        "rl",
        "--output",
        str(out),
        "--verbose",
        "0",
    ]
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ray_metaopt.cli import main; sys.exit(main(sys.argv[1:]))",
            *argv,
        ],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stdout = proc.stdout
    assert "final val_loss" in stdout and "best val_loss" in stdout and "steps/s" in stdout
    table = stdout[stdout.index("strategy  ") :].splitlines()
    assert [line.split()[0] for line in table[2:6]] == ["none", "cosine", "plateau", "rl"]

    png = out / "lr_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    with open(out / "results.csv") as f:
        rows = {r["strategy"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"none", "cosine", "plateau", "rl"}
    assert all(r["status"] == "done" and int(r["steps"]) == 60 for r in rows.values())
    # Each strategy really got its own configuration.
    assert float(rows["none"]["final_lr"]) == pytest.approx(1e-2) and int(rows["none"]["decisions"]) == 0
    assert float(rows["cosine"]["final_lr"]) < 1e-3  # the cosine schedule decayed it
    assert int(rows["rl"]["decisions"]) > 0
    assert float(rows["rl"]["final_lr"]) < 2e-3  # its actions multiply the cosine schedule by at most 2

    with open(out / "results.json") as f:
        summary = json.load(f)
    assert len(summary["trials"]) == 4
    assert summary["policy_stats"]["rollouts/transitions"] > 0  # the rl trial fed the shared policy
    from ray_metaopt.rl import load_policy

    assert load_policy(summary["policy_path"]) is not None
    trajectories = sorted(os.listdir(out / "trajectories"))
    assert len([t for t in trajectories if t.endswith(".json") and not t.endswith("decisions.json")]) == 4


def test_summary_per_strategy_over_seeds():
    from ray_metaopt.cli import format_summary, summarize

    rows = [
        {
            "strategy": "plateau",
            "status": "done",
            "final_val_loss": 1.0,
            "best_val_loss": 0.9,
            "decisions": 2,
        },
        {
            "strategy": "plateau",
            "status": "done",
            "final_val_loss": 2.0,
            "best_val_loss": 0.7,
            "decisions": 4,
        },
        {
            "strategy": "plateau",
            "status": "stopped: diverged",
            "final_val_loss": 9.0,
            "best_val_loss": 5.0,
            "decisions": 1,
        },
        {
            "strategy": "rl",
            "status": "ERROR",
            "final_val_loss": None,
            "best_val_loss": None,
            "decisions": None,
        },
    ]
    summary = summarize(rows)
    assert [(e["strategy"], e["trials"], e["done"]) for e in summary] == [("plateau", 3, 2), ("rl", 1, 0)]
    assert summary[0]["final_val_loss_mean"] == pytest.approx(1.5)
    assert summary[0]["best_val_loss_mean"] == pytest.approx(0.8)
    assert summary[0]["best_val_loss_std"] == pytest.approx(0.1414213, rel=1e-5)
    assert summary[0]["decisions_mean"] == pytest.approx(3.0)
    assert summary[1]["best_val_loss_mean"] is None
    lines = format_summary(summary).splitlines()
    assert lines[2].split() == ["plateau", "2/3", "1.5", "+-", "0.71", "0.8", "+-", "0.14", "3.0"]
    assert lines[3].split() == ["rl", "0/1", "-", "-", "-"]


# `--address` on a running two-node cluster (token auth), and its message without the token:
# tests/cluster/test_job_submission.py, on that test's cluster.


@pytest.mark.parametrize(
    "records, expected",
    [
        ([{"lr": 1.0, "lr/a": 1.0, "lr/b": 1.0}], ["lr"]),  # groups moving together: drawn once
        ([{"lr": 1.0, "lr/a": 1.0, "lr/b": 0.1}, {"lr": 0.5, "lr/a": 0.5, "lr/b": 0.1}], ["lr", "lr/b"]),
        ([{"lr/a": 1.0, "lr/b": 2.0}], ["lr/a", "lr/b"]),  # no "lr" key: the first group stands in
    ],
)
def test_plot_draws_each_distinct_lr_once(records, expected):
    from ray_metaopt.tune.plotting import _distinct_lr_keys

    assert _distinct_lr_keys(records) == expected


def test_plot_writes_png_with_non_finite_values(tmp_path):
    pytest.importorskip("matplotlib")
    from ray_metaopt.tune.plotting import plot_trajectories

    trajectories = [
        {
            "config": {"strategy": "plateau", "seed": 0},
            "records": [{"step": s, "lr": 0.1 / s, "val_loss": 1 / s} for s in range(1, 9)],
        },
        {
            "config": {"meta": "none"},
            "status": "ERROR",
            "records": [{"step": 1, "lr": 0.1, "val_loss": float("nan")}],
        },
        {"config": {}, "records": []},
    ]
    path = plot_trajectories(trajectories, tmp_path / "sub" / "p.png", loss_floor=0.05)
    assert path == str(tmp_path / "sub" / "p.png")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
