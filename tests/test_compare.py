"""scripts/compare.py: a tiny grid end to end, resuming it, rebuilding its table, its statistics, its errors."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

from rdrop import config

import numpy as np
import psutil
import pytest
import yaml
from run_helpers import ROOT, assert_same_weights, final_weights, load_script, tiny_config

compare = load_script("compare")

ARMS = ["--arm", "baseline", "rdrop.alpha=0", "--arm", "rdrop"]
SHORT = ["-o", "schedule.total_steps=4", "-o", "train.eval_every=2", "-o", "train.save_every=2"]
TABLE_FILES = ("table.txt", "runs.csv", "summary.csv", "results.json")


def run_compare(*args, timeout=900):
    """compare.py as a user runs it."""
    return subprocess.run(
        [sys.executable, "scripts/compare.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as stream:
        return list(csv.DictReader(stream))


def attempts(folder):
    with open(os.path.join(folder, compare.TIMING_FILE), encoding="utf-8") as stream:
        return len(json.load(stream)["attempts"])


def grid_snapshot(output_dir):
    return {name: (output_dir / name).read_text() for name in TABLE_FILES}


@pytest.mark.slow
def test_grid_trains_evaluates_resumes_and_rebuilds_the_same_table(tmp_path, archive):
    config_path = tiny_config(tmp_path, archive)
    grid = tmp_path / "grid"
    command = ["--config", config_path, *ARMS, "--seeds", "3", "5", "--consistency", "2", "--output-dir", str(grid)]
    first = run_compare(*command, *SHORT)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "run 4/4: arm 'rdrop' seed 5" in first.stdout

    for arm, alpha in (("baseline", 0.0), ("rdrop", 0.3)):
        for seed in (3, 5):
            folder = grid / arm / f"seed_{seed}"
            run_config = yaml.safe_load((folder / "config.yaml").read_text())
            assert (run_config["train"]["seed"], run_config["rdrop"]["alpha"]) == (seed, alpha)
            assert final_weights(folder)[0] == 4
    # Every seed's value in the table is the test top-1 eval.py measured for that run.
    rows = read_rows(grid / "runs.csv")
    assert [(row["arm"], row["seed"]) for row in rows] == [
        ("baseline", "3"),
        ("rdrop", "3"),
        ("baseline", "5"),
        ("rdrop", "5"),
    ]
    measured = {}
    for row in rows:
        metrics = json.loads((grid / row["arm"] / f"seed_{row['seed']}" / "test_metrics.json").read_text())
        assert metrics["num_samples"] == 21 and metrics["consistency"]["samples"] == 2
        assert float(row["top1"]) == pytest.approx(metrics["top1"])
        measured[row["arm"], int(row["seed"])] = metrics["top1"]
    summary = {(row["kind"], row["name"], row["metric"]): row for row in read_rows(grid / "summary.csv")}
    difference = summary["difference", "rdrop - baseline", "top1"]
    expected = [measured["rdrop", seed] - measured["baseline", seed] for seed in (3, 5)]
    assert float(difference["mean"]) == pytest.approx(np.mean(expected))
    assert int(difference["n"]) == 2
    assert (grid / "comparison.png").read_bytes().startswith(b"\x89PNG")

    # Rebuilt from the run folders alone, every file equals the one the grid wrote.
    first_table = grid_snapshot(grid)
    for name in TABLE_FILES:
        os.remove(grid / name)
    rebuilt = run_compare("--output-dir", str(grid), "--table-only")
    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    assert grid_snapshot(grid) == first_table

    # Interrupted after step 2 of its last run: that run resumes from step 2 and ends with the weights
    # it had without the interruption; the other runs are not repeated.
    last = grid / "rdrop" / "seed_5"
    _, uninterrupted = final_weights(last)
    for leftover in ("test_metrics.json", "checkpoints/step_4/trainer_state.json"):
        os.remove(last / leftover)
    resumed = run_compare(*command, *SHORT)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [attempts(grid / arm / f"seed_{seed}") for seed in (3, 5) for arm in ("baseline", "rdrop")] == [1, 1, 1, 2]
    step, weights = final_weights(last)
    assert step == 4
    assert_same_weights(weights, uninterrupted)


@pytest.mark.slow
def test_runs_go_through_the_launcher(tmp_path, archive):
    config_path = tiny_config(tmp_path, archive)
    grid = tmp_path / "grid"
    result = run_compare(
        "--config", config_path, "--arm", "rdrop", "--seeds", "1", "--nproc_per_node", "2", "--output-dir", str(grid),
        "-o", "schedule.total_steps=2", "-o", "train.eval_every=2",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    folder = grid / "rdrop" / "seed_1"
    assert os.path.isfile(folder / "launch" / "workerlog.1")  # two training processes
    assert os.path.isfile(folder / "launch_eval" / "workerlog.1")
    assert json.loads((folder / "test_metrics.json").read_text())["num_samples"] == 21


def test_a_failed_run_stops_the_grid_naming_its_folder_and_log(tmp_path, archive):
    config_path = tiny_config(tmp_path, archive)
    grid = tmp_path / "grid"
    result = run_compare(
        "--config", config_path, "--arm", "broken", f"data.data_file={tmp_path / 'missing.tar.gz'}",
        "--arm", "rdrop", "--seeds", "0", "--output-dir", str(grid),
    )  # fmt: skip
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    folder = str(grid / "broken" / "seed_0")
    assert message.startswith("error: The training of arm 'broken' seed 0 failed")
    assert folder in message and os.path.join(folder, "train.log") in message
    assert not (grid / "rdrop").exists()


QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def fake_grid(grid, arms, seeds):
    """grid.json of a grid of quickstart arms (name, override...), as compare.py writes it."""
    arguments = ["--config", QUICKSTART, "--output-dir", str(grid), "--seeds", *map(str, seeds)]
    for arm in arms:
        arguments += ["--arm", *arm]
    definition = compare.define_grid(compare.parse_args(arguments))
    grid.mkdir(parents=True, exist_ok=True)
    (grid / compare.GRID_FILE).write_text(json.dumps(definition))
    return definition


def fake_run(grid, arm, seed, top1, cross_entropy, train_seconds, overrides=()):
    """A finished run: the config train.py would have saved, its last checkpoint, and test metrics."""
    folder = grid / arm / f"seed_{seed}"
    (folder / "checkpoints" / "step_1000").mkdir(parents=True)
    (folder / "checkpoints" / "step_1000" / "trainer_state.json").write_text("{}")
    overrides = [*overrides, f"train.seed={seed}", f"train.output_dir={folder}"]
    config.save(config.load(QUICKSTART, overrides), str(folder / "config.yaml"))
    metrics = {"top1": top1, "top5": 100.0, "cross_entropy": cross_entropy, "num_samples": 300}
    (folder / compare.TEST_METRICS).write_text(json.dumps(metrics))
    timing = {"attempts": [{"seconds": s, "exit_code": 0, "load_average_end": [1, 1, 1]} for s in train_seconds]}
    (folder / compare.TIMING_FILE).write_text(json.dumps(timing))


def test_statistics_match_hand_computed_values(tmp_path, capsys):
    """Three arms; the paired-t interval checked against a printed t table and against scipy's ttest_rel."""
    grid = tmp_path / "grid"
    baseline = {0: 90.0, 1: 91.0, 2: 92.0, 3: 93.0, 4: 94.0}
    rdrop = {0: 91.0, 1: 93.0, 2: 95.0, 3: 97.0, 4: 99.0}  # differences 1, 2, 3, 4, 5
    wide = {0: 80.0, 2: 90.0}  # two seeds only
    fake_grid(grid, [["baseline", "rdrop.alpha=0"], ["rdrop"], ["wide", "rdrop.alpha=2"]], [0, 1, 2, 3, 4])
    for seed in baseline:
        fake_run(grid, "baseline", seed, baseline[seed], 0.5, [60.0], ["rdrop.alpha=0"])
        fake_run(grid, "rdrop", seed, rdrop[seed], 0.4, [30.0, 60.0])
    for seed, top1 in wide.items():
        fake_run(grid, "wide", seed, top1, 0.3, [120.0], ["rdrop.alpha=2"])

    summary = compare.main(["--output-dir", str(grid), "--table-only"])
    arms = {(row["arm"], row["metric"]): row for row in summary["arms"]}
    pairs = {(row["pair"], row["metric"]): row for row in summary["pairs"]}
    assert arms["baseline", "top1"]["mean"] == pytest.approx(92.0)
    assert arms["baseline", "top1"]["std"] == pytest.approx(math.sqrt(2.5))  # squares 4+1+0+1+4 over n-1 = 4
    assert arms["rdrop", "train_minutes"]["mean"] == pytest.approx(1.5)  # two attempts of 30 s and 60 s
    assert arms["wide", "top1"]["n"] == 2 and arms["wide", "top1"]["per_seed"] == wide

    difference = pairs["rdrop - baseline", "top1"]
    half_width = 2.7764 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) = 2.7764 from a printed t table
    assert difference["n"] == 5 and difference["mean"] == pytest.approx(3.0)
    assert (difference["ci_low"], difference["ci_high"]) == pytest.approx((3 - half_width, 3 + half_width), abs=1e-4)

    row = pairs["wide - baseline", "top1"]  # the pair covers only the 2 seeds both arms finished
    assert row["n"] == 2 and row["mean"] == pytest.approx(-6.0) and math.isnan(row["ci_low"])
    assert row["ci_undefined"] == "undefined: n = 2 < 3 seeds"
    assert "consistency_kl" not in summary["metrics"]  # not measured: no column, no panel

    printed = capsys.readouterr().out
    assert "rdrop - baseline" in printed and "[1.04, 4.96]  (n=5)" in printed
    assert "-6.00  [undefined: n = 2 < 3 seeds]  (n=2)" in printed
    assert {row["name"] for row in read_rows(grid / "summary.csv") if row["kind"] == "difference"} == {
        "rdrop - baseline",
        "wide - baseline",
        "wide - rdrop",
    }


@pytest.mark.parametrize(
    "args, words",
    [
        (["--arm", "same", "--arm", "same"], ["same", "twice"]),
        (["--arm", "bad/name"], ["bad/name", "folder name"]),
        (["--seeds", "1", "1"], ["distinct seeds"]),
        (["--arm", "x", "rdrop.alpa=1"], ["rdrop.alpa"]),
    ],
)
def test_user_errors_end_in_one_paragraph_before_training(tmp_path, archive, capsys, args, words):
    config_path = tiny_config(tmp_path, archive)
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--config", config_path, "--output-dir", str(tmp_path / "grid"), *args])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert error.startswith("error: ") and "\n" not in error and "Traceback" not in error
    assert all(word in error for word in words)
    assert not any(path.is_dir() for path in (tmp_path / "grid").glob("*"))  # nothing trained


def test_a_run_measured_with_another_consistency_is_evaluated_again(tmp_path):
    assert not compare.evaluated(tmp_path, 8)
    metrics = {"top1": 50.0, "top5": 90.0, "cross_entropy": 1.5}
    (tmp_path / compare.TEST_METRICS).write_text(json.dumps(metrics))
    assert compare.evaluated(tmp_path, 0) and not compare.evaluated(tmp_path, 8)
    (tmp_path / compare.TEST_METRICS).write_text(json.dumps(dict(metrics, consistency={"samples": 8})))
    assert compare.evaluated(tmp_path, 8) and not compare.evaluated(tmp_path, 4)


def test_table_only_on_a_folder_without_a_grid(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--output-dir", str(tmp_path), "--table-only"])
    assert exit_info.value.code == 2
    assert "not a compare.py grid folder" in capsys.readouterr().err


def test_a_seed_given_twice_is_refused_not_counted_twice(tmp_path, capsys):
    grid = tmp_path / "grid"
    fake_grid(grid, [["baseline", "rdrop.alpha=0"], ["rdrop"]], [0, 1])
    for seed, (base, rdrop) in enumerate([(90.0, 91.0), (91.0, 93.0)]):
        fake_run(grid, "baseline", seed, base, 0.5, [60.0], ["rdrop.alpha=0"])
        fake_run(grid, "rdrop", seed, rdrop, 0.4, [60.0])
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--output-dir", str(grid), "--table-only", "--seeds", "0", "0", "0", "1"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in error
    assert "--seeds 0 0 0 1: give distinct seeds" in error
    assert not (grid / "table.txt").exists()


def test_runs_of_other_settings_are_not_reported_as_this_grids(tmp_path, capsys):
    grid = tmp_path / "grid"
    fake_grid(grid, [["rdrop"]], [0, 1, 2])
    for seed in (0, 1, 2):
        fake_run(grid, "rdrop", seed, 90.0 + seed, 0.4, [60.0])
    written = (grid / compare.GRID_FILE).read_text()
    # The same command with another -o: the runs in the folder are not this grid's, and grid.json keeps
    # claiming the settings they were trained with.
    command = ["--config", QUICKSTART, "--arm", "rdrop", "--seeds", "0", "1", "2", "--output-dir", str(grid)]
    with pytest.raises(SystemExit) as exit_info:
        compare.main([*command, "-o", "optimizer.lr=0.001"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in error
    assert f"{grid / 'rdrop' / 'seed_0'} holds a run trained with other settings" in error
    assert "optimizer.lr: 0.003 -> 0.001" in error
    assert (grid / compare.GRID_FILE).read_text() == written
    # Rebuilding the table of the other settings counts none of these runs.
    with pytest.raises(SystemExit) as exit_info:
        compare.main([*command, "-o", "optimizer.lr=0.001", "--table-only"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2 and "No finished runs of this grid" in captured.err
    assert "was not trained with arm 'rdrop' seed 1's settings (optimizer.lr: 0.003 -> 0.001)" in captured.out
    # A run whose config was edited since is left out, the others still count.
    run_config = grid / "rdrop" / "seed_2" / "config.yaml"
    run_config.write_text(run_config.read_text().replace("alpha: 1.0", "alpha: 0.5"))
    summary = compare.main(["--output-dir", str(grid), "--table-only"])
    assert {row["metric"]: row["n"] for row in summary["arms"]}["top1"] == 2
    assert "seed_2 was not trained with arm 'rdrop' seed 2's settings (rdrop.alpha: 0.5 -> 1.0)" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "file, content",
    [
        (compare.TEST_METRICS, '{"top1": 91.0, "top5"'),
        (compare.TEST_METRICS, "[91.0, 100.0, 0.4]"),
        (compare.TEST_METRICS, '{"top1": "91", "top5": 100.0, "cross_entropy": 0.4}'),
        (compare.TEST_METRICS, '{"top1": 91.0, "top5": 100.0, "cross_entropy": 0.4, "consistency": []}'),
        (compare.TIMING_FILE, '{"attempts": [{"seconds": 60.0}, {"seconds": null}]}'),
        (compare.TIMING_FILE, '{"attempts": {"seconds": 60.0}}'),
        (compare.TIMING_FILE, "\xff\xfe"),
        (compare.GRID_FILE, '{"arms": [{"name": "rdrop"}], "seeds": [0, 1, 2]}'),
        (compare.GRID_FILE, '[{"name": "rdrop"}]'),
        (compare.GRID_FILE, '{"arms": '),
    ],
)
def test_damaged_result_files_end_in_one_paragraph_naming_the_file(tmp_path, capsys, file, content):
    grid = tmp_path / "grid"
    fake_grid(grid, [["baseline", "rdrop.alpha=0"], ["rdrop"]], [0, 1, 2])
    for seed in (0, 1, 2):
        fake_run(grid, "baseline", seed, 90.0, 0.5, [60.0], ["rdrop.alpha=0"])
        fake_run(grid, "rdrop", seed, 91.0 + seed, 0.4, [60.0])
    damaged = grid / file if file == compare.GRID_FILE else grid / "rdrop" / "seed_1" / file
    damaged.write_text(content, encoding="latin-1")
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--output-dir", str(grid), "--table-only"])
    error = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert error.startswith(f"error: {damaged} is damaged") and "\n" not in error and "Traceback" not in error


CONCURRENT_ATTEMPT = """
import os, sys, time
sys.path.insert(0, os.path.join(sys.argv[3], "tests"))
from run_helpers import load_script

compare = load_script("compare")
folder, release = sys.argv[1], sys.argv[2]
waits = f"import os, time\\nwhile not os.path.exists({release!r}): time.sleep(0.01)"
compare.script_command = lambda launcher, log_dir, script, args: [sys.executable, "-c", waits]
arm = {"name": "rdrop", "config": "unused.yaml", "overrides": []}
compare.train_run({"launcher": [], "overrides": []}, arm, 0, folder, compare.Subprocesses())
"""


def test_two_processes_training_one_run_both_record_their_attempt(tmp_path):
    """The first process's run lasts until the test releases it; meanwhile a second process runs the same
    run to its end (as a second compare.py on the same folder would). Both attempts are kept."""
    folder, release = tmp_path / "grid" / "rdrop" / "seed_0", tmp_path / "release"

    def attempt(release_file):
        return subprocess.Popen([sys.executable, "-c", CONCURRENT_ATTEMPT, str(folder), str(release_file), ROOT])

    first = attempt(release)
    while not psutil.Process(first.pid).children():  # its run has started
        assert first.poll() is None
        time.sleep(0.05)
    (tmp_path / "open").touch()
    second = attempt(tmp_path / "open")
    assert second.wait(timeout=300) == 0
    assert attempts(folder) == 1
    release.touch()
    assert first.wait(timeout=300) == 0
    assert attempts(folder) == 2


HUNG_UP_GRID = """
import os, sys
sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
from run_helpers import load_script

compare = load_script("compare")
child = (
    "import pathlib, signal, sys, time\\n"
    "def stop(signum, frame):\\n"
    f"    pathlib.Path({sys.argv[1]!r}).write_text(signal.Signals(signum).name)\\n"
    "    sys.exit(0)\\n"
    "signal.signal(signal.SIGTERM, stop)\\n"
    f"pathlib.Path({sys.argv[1] + '.ready'!r}).touch()\\n"
    "time.sleep(60)\\n"
)
runner = compare.Subprocesses()
code = runner.run([sys.executable, "-c", child])
print(runner.interrupted, code)
"""


def test_a_closed_terminal_stops_the_running_child_as_sigterm(tmp_path):
    """SIGHUP to compare.py reaches its run as SIGTERM (a launcher would die of SIGHUP, leaving its
    workers), and the grid knows it was interrupted."""
    received = tmp_path / "received"
    grid = subprocess.Popen(
        [sys.executable, "-c", HUNG_UP_GRID, str(received), ROOT], stdout=subprocess.PIPE, text=True
    )
    while not (tmp_path / "received.ready").exists():  # its run has started and handles SIGTERM
        assert grid.poll() is None
        time.sleep(0.05)
    grid.send_signal(signal.SIGHUP)
    out, _ = grid.communicate(timeout=60)
    assert received.read_text() == "SIGTERM"
    assert out.split() == ["SIGHUP", "0"]
