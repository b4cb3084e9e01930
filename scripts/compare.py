"""Compare training arms over several seeds: test metrics as mean ± std, paired differences with 95% intervals.

    python scripts/compare.py --config configs/quickstart.yaml --arm baseline rdrop.alpha=0 --arm rdrop \\
        --seeds 0 1 2 3 4 --consistency 8 --output-dir output/compare_quickstart
    python scripts/compare.py ... --nproc_per_node 2        (each run on 2 CPU processes)
    python scripts/compare.py ... --devices 0,1,2,3          (each run on 4 GPUs)
    python scripts/compare.py --output-dir output/compare_quickstart --table-only

`--arm NAME [CONFIG.yaml] [SECTION.KEY=VALUE ...]` names one arm: the config it trains (default:
--config) and the overrides that make it different; without --arm the grid is `baseline` (rdrop.alpha=0)
against `rdrop` (the config as it is). `-o` overrides apply to every arm. Seed s of every arm runs
with `-o train.seed=s`, so the arms' seed-s runs share initialisation, data order and augmentation
and the paired difference between them removes that variation.

Every run is an ordinary train.py run in OUTPUT_DIR/ARM/seed_S, started with the launcher arguments
given here, seed by seed (seed 0 of every arm, then seed 1, ...) so a stopped grid holds complete
pairs. Rerunning the same command resumes: finished runs are kept, an interrupted one continues with
`-o train.resume=auto`. After training, eval.py evaluates the run's best.pdparams on the test split
(`--output test_metrics.json`, `--consistency K` if given).

The table reports, per arm, the mean ± sample standard deviation over seeds of top-1, top-5, cross-entropy,
the dropout consistency (with --consistency) and the training wall time, and each seed's value; per
pair of arms, the mean paired difference (later arm minus earlier arm, in --arm order) with a 95%
paired-t interval, mean ± t(0.975, n-1) · sd / sqrt(n) over the n seeds both arms completed. It is
printed and written to OUTPUT_DIR as table.txt, runs.csv, summary.csv, results.json and
comparison.png; --table-only rebuilds all of them from the run folders without training.
"""

import argparse
import contextlib
import csv
import fcntl
import json
import logging
import math
import os
import pathlib
import re
import reprlib
import signal
import subprocess
import sys
import time

from rdrop import atomic, checkpoint, comparison, config, logs
from rdrop.errors import UserError, exit_missing_dependency, exit_on_user_error

import numpy as np

try:
    from matplotlib.figure import Figure
except ImportError as error:
    exit_missing_dependency(error, "scripts/compare.py (for comparison.png)", "pip install -r requirements.txt")

ROOT = pathlib.Path(__file__).resolve().parent.parent  # where train.py and eval.py are

logger = logging.getLogger("compare")

GRID_FILE = "grid.json"  # the grid's definition, so --table-only needs only the output folder
TEST_METRICS = "test_metrics.json"
TIMING_FILE = "compare_timing.json"
TIMING_LOCK = ".compare_timing.lock"
DEFAULT_ARMS = [["baseline", "rdrop.alpha=0"], ["rdrop"]]
# (key, column header, how to read it from the run's record)
METRICS = (
    ("top1", "test top-1 %", lambda run: run["test"]["top1"]),
    ("top5", "test top-5 %", lambda run: run["test"]["top5"]),
    ("cross_entropy", "test cross-entropy", lambda run: run["test"]["cross_entropy"]),
    ("consistency_kl", "dropout sym. KL", lambda run: run["test"].get("consistency", {}).get("symmetric_kl")),
    (
        "disagreement",
        "dropout top-1 disagreement %",
        lambda run: run["test"].get("consistency", {}).get("disagreement"),
    ),
    ("train_minutes", "training wall time (min)", lambda run: run["train_seconds"] / 60),
)
ARM_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_arguments(parser, "YAML config every arm trains unless the arm names its own; -o applies to every arm")
    parser.add_argument(
        "--arm",
        nargs="+",
        action="append",
        metavar="NAME [CONFIG.yaml] [SECTION.KEY=VALUE]",
        help="one arm of the grid; repeat for each arm (default: baseline rdrop.alpha=0, and rdrop)",
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, metavar="SEED", help="train.seed of the runs (default 0 1 2 3 4)"
    )
    parser.add_argument("--output-dir", required=True, help="folder of the grid: one run folder per arm and seed")
    parser.add_argument(
        "--consistency", type=int, default=0, metavar="K", help="also measure dropout consistency with K samples"
    )
    launcher = parser.add_mutually_exclusive_group()
    launcher.add_argument("--nproc_per_node", type=int, help="run each train.py/eval.py on this many processes")
    launcher.add_argument("--devices", help="run each train.py/eval.py on these GPUs, e.g. 0,1,2,3")
    parser.add_argument(
        "--table-only", action="store_true", help="rebuild the table and files from the run folders, train nothing"
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------------
# The grid: arms x seeds, each run a train.py output folder.


def parse_arm(tokens, default_config):
    name, rest = tokens[0], tokens[1:]
    if not ARM_NAME.match(name) or name in (".", ".."):
        raise UserError(
            f"Arm name '{name}' is not usable as a folder name. Use letters, digits, '_', '-' or '.', "
            f"e.g. --arm baseline rdrop.alpha=0."
        )
    configs = [token for token in rest if "=" not in token]
    if len(configs) > 1:
        raise UserError(
            f"Arm '{name}' names {len(configs)} configs ({', '.join(configs)}); give at most one YAML file, "
            f"then SECTION.KEY=VALUE overrides."
        )
    arm_config = configs[0] if configs else default_config
    if arm_config is None:
        raise UserError(f"Arm '{name}' has no config: pass --config, or name a YAML file after the arm's name.")
    return {"name": name, "config": arm_config, "overrides": [token for token in rest if "=" in token]}


def define_grid(args):
    arms = [parse_arm(tokens, args.config) for tokens in (args.arm or DEFAULT_ARMS)]
    names = [arm["name"] for arm in arms]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError(f"Arm name(s) {', '.join(duplicates)} given twice. Give every --arm its own name.")
    seeds = checked_seeds(args.seeds if args.seeds is not None else [0, 1, 2, 3, 4])
    if args.consistency < 0:
        raise UserError(f"--consistency must be a number of dropout samples >= 0, got {args.consistency}.")
    grid = {"arms": arms, "seeds": seeds, "overrides": args.override, "consistency": args.consistency}
    grid["launcher"] = launcher_args(args)
    for arm in arms:
        arm["definition"] = arm_definition(grid, arm)
    return grid


def checked_seeds(seeds):
    """A seed given twice would be counted as two runs: n, and the interval, would claim more evidence
    than the grid has."""
    if len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UserError(
            f"--seeds {' '.join(map(str, seeds))}: give distinct seeds >= 0. Each seed is one run per arm, "
            f"and the statistics count runs, so a repeated seed would count one run several times."
        )
    return seeds


def arm_definition(grid, arm):
    """The settings that define the arm's runs (config.run_definition, train.seed left out): a run
    folder counts for the arm only if its config.yaml has exactly these."""
    cfg = config.load(arm["config"], run_overrides(grid, arm, grid["seeds"][0], "unused"))
    return {key: value for key, value in config.run_definition(cfg).items() if key != "train.seed"}


def definition_differences(folder, arm, seed):
    """How the run in `folder` differs from the arm's definition at `seed` ("key: run's -> arm's"), or
    None if the folder holds no run config yet."""
    path = os.path.join(folder, checkpoint.RUN_CONFIG)
    if not os.path.exists(path):
        return None
    run = config.run_definition(config.load(path))
    expected = dict(arm["definition"], **{"train.seed": seed})
    return [
        f"{key}: {config.shown(run.get(key))} -> {config.shown(value)}"
        for key, value in expected.items()
        if run.get(key) != value
    ]


def refuse_other_runs(grid, output_dir):
    """Before grid.json is written: a run folder trained with other settings would be reported as this
    grid's run, or resumed with settings it did not start with."""
    for seed in grid["seeds"]:
        for arm in grid["arms"]:
            folder = run_dir(output_dir, arm, seed)
            differences = definition_differences(folder, arm, seed)
            if differences:
                raise UserError(
                    f"{folder} holds a run trained with other settings than arm '{arm['name']}' seed {seed} "
                    f"has now ({'; '.join(differences[:5])}). It cannot count for this grid. Use another "
                    f"--output-dir for these settings, rerun with the settings of that run, or delete "
                    f"{folder} to train it again."
                )


def launcher_args(args):
    if args.nproc_per_node is not None:
        if args.nproc_per_node < 1:
            raise UserError(f"--nproc_per_node must be at least 1, got {args.nproc_per_node}.")
        return ["--nproc_per_node", str(args.nproc_per_node)]
    if args.devices is not None:
        return ["--devices", args.devices]
    return []


def run_dir(output_dir, arm, seed):
    return os.path.join(output_dir, arm["name"], f"seed_{seed}")


def run_overrides(grid, arm, seed, output_dir):
    return grid["overrides"] + arm["overrides"] + [f"train.seed={seed}", f"train.output_dir={output_dir}"]


def total_steps(grid, arm, seed, folder):
    """The run's schedule.total_steps, from the config train.py would resolve; a bad config or override
    is reported here, before anything trains."""
    cfg = config.load(arm["config"], run_overrides(grid, arm, seed, folder))
    return cfg["schedule"]["total_steps"]


def trained(folder, steps):
    saved = checkpoint.list_checkpoints(folder)
    return bool(saved) and saved[-1][0] >= steps


def script_command(launcher, log_dir, script, args):
    if launcher:
        return [sys.executable, "-m", "paddle.distributed.launch", *launcher, "--log_dir", log_dir, script, *args]
    return [sys.executable, script, *args]


class Subprocesses:
    """Runs one child at a time. Ctrl-C, SIGTERM or SIGHUP (a closed terminal) reaches the child (same
    process group, or forwarded), which stops cleanly with a checkpoint; we wait for it instead of
    killing it, then stop the grid. SIGHUP goes on as SIGTERM: Paddle's launcher, the child of a
    multi-process run, would die of a SIGHUP and leave its workers behind."""

    def __init__(self):
        self.child = None
        self.interrupted = None
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._forward)

    def _forward(self, signum, frame):
        self.interrupted = signal.Signals(signum).name
        if self.child is not None:
            self.child.send_signal(signal.SIGTERM)

    def run(self, command):
        self.child = subprocess.Popen(command)
        while True:
            try:
                code = self.child.wait()
                break
            except KeyboardInterrupt:
                self.interrupted = "SIGINT"
        self.child = None
        return code


def read_json(path, check, fix):
    """The JSON file at `path`, which `check(value)` accepts (it returns what is wrong, or None); a
    missing, truncated or edited file ends in one paragraph naming it, with `fix`."""
    try:
        with open(path, encoding="utf-8") as stream:
            value = json.load(stream)
        problem = check(value)
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        problem = f"{type(error).__name__}: {error}"
    if problem:
        raise UserError(f"{path} is damaged or not what compare.py wrote ({' '.join(problem.split())}). {fix}")
    return value


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_texts(value):
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def metrics_problem(metrics):
    if not isinstance(metrics, dict):
        return f"a {type(metrics).__name__}, not an object"
    wrong = [key for key in ("top1", "top5", "cross_entropy") if not _is_number(metrics.get(key))]
    consistency = metrics.get("consistency", {})
    if not isinstance(consistency, dict):
        wrong.append("consistency")
    else:
        wrong += [f"consistency.{key}" for key, value in consistency.items() if not _is_number(value)]
    return f"not numbers: {', '.join(wrong)}" if wrong else None


def timing_problem(timing):
    attempts = timing.get("attempts") if isinstance(timing, dict) else None
    if not isinstance(attempts, list):
        return "no list of attempts"
    for attempt in attempts:
        loads = attempt.get("load_average_end", []) if isinstance(attempt, dict) else None
        if not (isinstance(attempt, dict) and _is_number(attempt.get("seconds"))):
            return f"an attempt without its seconds: {reprlib.repr(attempt)}"
        if not (isinstance(loads, list) and all(map(_is_number, loads))):
            return f"an attempt's load_average_end is not a list of numbers: {reprlib.repr(loads)}"
    return None


def grid_problem(grid):
    if not isinstance(grid, dict):
        return f"a {type(grid).__name__}, not an object"
    arms, seeds = grid.get("arms"), grid.get("seeds")
    if (
        not isinstance(arms, list)
        or not arms
        or not all(
            isinstance(arm, dict)
            and isinstance(arm.get("name"), str)
            and ARM_NAME.match(arm["name"])
            and isinstance(arm.get("config"), str)
            and _is_texts(arm.get("overrides"))
            and isinstance(arm.get("definition"), dict)
            for arm in arms
        )
    ):
        return "arms is not a list of {name, config, overrides, definition}"
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        return "seeds is not a list of whole numbers"
    if not (_is_texts(grid.get("overrides")) and _is_texts(grid.get("launcher"))):
        return "overrides or launcher is not a list of texts"
    if not (isinstance(grid.get("consistency"), int) and not isinstance(grid["consistency"], bool)):
        return "consistency is not a whole number"
    return None


RERUN_EVALUATION = "Delete it and rerun the same compare.py command (without --table-only) to evaluate the run again."
FORGET_TIMING = "Delete it to continue without that run's training time, or rerun the run in a new --output-dir."


def read_metrics(path):
    return read_json(path, metrics_problem, RERUN_EVALUATION)


def record_attempt(folder, attempt):
    """Append `attempt` to the run's timing file under a lock, read after the run: two compare.py
    processes on one grid each add their attempts, neither overwrites the other's."""
    os.makedirs(folder, exist_ok=True)
    timing_path = os.path.join(folder, TIMING_FILE)
    lock = os.open(os.path.join(folder, TIMING_LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        exists = os.path.exists(timing_path)
        timing = read_json(timing_path, timing_problem, FORGET_TIMING) if exists else {"attempts": []}
        timing["attempts"].append(attempt)
        atomic.write_json(timing_path, timing)
    finally:
        os.close(lock)  # releases the lock


def train_run(grid, arm, seed, folder, processes):
    log = os.path.join(folder, "train.log")
    args = ["--config", arm["config"]]
    for override in run_overrides(grid, arm, seed, folder) + ["train.resume=auto"]:
        args += ["-o", override]
    load_start, start = os.getloadavg(), time.perf_counter()
    code = processes.run(script_command(grid["launcher"], os.path.join(folder, "launch"), str(ROOT / "train.py"), args))
    attempt = {
        "seconds": time.perf_counter() - start,
        "exit_code": code,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    record_attempt(folder, attempt)
    return code, log


def evaluated(folder, consistency):
    """The run's test metrics exist and were measured with this grid's --consistency (else evaluate again)."""
    path = os.path.join(folder, TEST_METRICS)
    if not os.path.exists(path):
        return False
    return read_metrics(path).get("consistency", {}).get("samples", 0) == consistency


def evaluate_run(grid, folder, processes):
    args = [
        "--checkpoint",
        os.path.join(folder, checkpoint.BEST_WEIGHTS),
        "--output",
        os.path.join(folder, TEST_METRICS),
    ]
    if grid["consistency"]:
        args += ["--consistency", str(grid["consistency"])]
    return processes.run(
        script_command(grid["launcher"], os.path.join(folder, "launch_eval"), str(ROOT / "eval.py"), args)
    )


def stop_if_failed(code, what, arm, seed, folder, log, processes):
    if processes.interrupted:
        raise UserError(
            f"Grid stopped by {processes.interrupted} during {what} of arm '{arm['name']}' seed {seed} "
            f"({folder}). Rerun the same command to continue: finished runs are kept and this one resumes."
        )
    if code != 0:
        raise UserError(
            f"The {what} of arm '{arm['name']}' seed {seed} failed with exit code {code}; the grid stops. "
            f"Its output folder is {folder} and its log {log} (the console shows the error too). Fix "
            f"the cause and rerun the same command: finished runs are kept and this one resumes."
        )


def run_grid(grid, output_dir):
    runs = [(seed, arm) for seed in grid["seeds"] for arm in grid["arms"]]
    steps = {(arm["name"], seed): total_steps(grid, arm, seed, run_dir(output_dir, arm, seed)) for seed, arm in runs}
    processes = Subprocesses()
    durations = []
    for index, (seed, arm) in enumerate(runs, start=1):
        folder = run_dir(output_dir, arm, seed)
        label = f"run {index}/{len(runs)}: arm '{arm['name']}' seed {seed} in {folder}"
        needs_training = not trained(folder, steps[arm["name"], seed])
        if not needs_training and evaluated(folder, grid["consistency"]):
            logger.info("%s: done already", label)
            continue
        remaining = len(runs) - index + 1  # this run and the ones after it (any already done make it shorter)
        eta = f"; grid ETA {logs.format_duration(remaining * np.mean(durations))}" if durations else ""
        state = " (resuming)" if needs_training and checkpoint.list_checkpoints(folder) else ""
        logger.info("%s%s%s", label, state if needs_training else " (trained; evaluating)", eta)
        start = time.perf_counter()
        if needs_training:
            code, log = train_run(grid, arm, seed, folder, processes)
            stop_if_failed(code, "training", arm, seed, folder, log, processes)
            if not trained(folder, steps[arm["name"], seed]):
                raise UserError(
                    f"The training of arm '{arm['name']}' seed {seed} ended before schedule.total_steps "
                    f"({steps[arm['name'], seed]}) without an error; see {log}. Rerun the same command to resume it."
                )
        code = evaluate_run(grid, folder, processes)
        eval_log = os.path.join(folder, "launch_eval", "workerlog.0") if grid["launcher"] else "on the console above"
        stop_if_failed(code, "evaluation", arm, seed, folder, eval_log, processes)
        durations.append(time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------------
# The results: read back from the run folders, so a rebuilt table equals the first.


def collect_runs(grid, output_dir):
    """One record per finished run (trained with its arm's settings and evaluated), in grid order; the
    runs left out are listed with the reason."""
    runs, left_out = [], []
    for seed in grid["seeds"]:
        for arm in grid["arms"]:
            folder = run_dir(output_dir, arm, seed)
            metrics_path, timing_path = os.path.join(folder, TEST_METRICS), os.path.join(folder, TIMING_FILE)
            if not os.path.exists(metrics_path):
                left_out.append((folder, f"has no {TEST_METRICS} (not trained or not evaluated yet)"))
                continue
            differences = definition_differences(folder, arm, seed)
            if differences is None or differences:
                why = "; ".join(differences[:5]) if differences else f"no {checkpoint.RUN_CONFIG}"
                left_out.append((folder, f"was not trained with arm '{arm['name']}' seed {seed}'s settings ({why})"))
                continue
            exists = os.path.exists(timing_path)
            attempts = read_json(timing_path, timing_problem, FORGET_TIMING)["attempts"] if exists else []
            runs.append(
                {
                    "arm": arm["name"],
                    "seed": seed,
                    "folder": folder,
                    "test": read_metrics(metrics_path),
                    "train_seconds": sum(attempt["seconds"] for attempt in attempts) if attempts else math.nan,
                    "load_average_end": attempts[-1].get("load_average_end", []) if attempts else None,
                }
            )
    return runs, left_out


def summarise(grid, runs):
    """The statistics (rdrop/comparison.py) of the metrics some run measured, per arm and per pair of arms."""
    value = {(run["arm"], run["seed"], key): read(run) for run in runs for key, _, read in METRICS}
    metrics = [
        key for key, _, _ in METRICS if any(v is not None and math.isfinite(v) for k, v in value.items() if k[2] == key)
    ]
    arms, pairs = comparison.summarise([arm["name"] for arm in grid["arms"]], grid["seeds"], metrics, value)
    return {"metrics": metrics, "arms": arms, "pairs": pairs}


def _number(value, digits):
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


DIGITS = {"top1": 2, "top5": 2, "cross_entropy": 4, "consistency_kl": 4, "disagreement": 2, "train_minutes": 2}


def format_table(summary):
    headers = {key: header for key, header, _ in METRICS}
    lines = ["Per arm: mean ± standard deviation over seeds (n), then each seed's value (seed: value)"]
    for key in summary["metrics"]:
        lines.append(f"  {headers[key]}")
        digits = DIGITS[key]
        for row in (row for row in summary["arms"] if row["metric"] == key):
            seeds = "  ".join(f"{seed}: {_number(v, digits)}" for seed, v in row["per_seed"].items())
            lines.append(
                f"    {row['arm']:<16} {_number(row['mean'], digits):>9} ± {_number(row['std'], digits):<8} "
                f"(n={row['n']})   {seeds}"
            )
    if summary["pairs"]:
        lines.append(
            f"Paired differences over seeds: mean, {comparison.CONFIDENCE:.0%} paired-t interval "
            f"(mean ± t(0.975, n-1) · sd / sqrt(n)), n seeds"
        )
        for key in summary["metrics"]:
            lines.append(f"  {headers[key]}")
            digits = DIGITS[key]
            for row in (row for row in summary["pairs"] if row["metric"] == key):
                interval = row["ci_undefined"] or f"{_number(row['ci_low'], digits)}, {_number(row['ci_high'], digits)}"
                lines.append(f"    {row['pair']:<24} {_number(row['mean'], digits):>9}  [{interval}]  (n={row['n']})")
    return "\n".join(lines)


def write_outputs(output_dir, grid, runs, summary, table):
    with replaced(os.path.join(output_dir, "table.txt")) as stream:
        stream.write(table + "\n")
    with replaced(os.path.join(output_dir, "runs.csv")) as stream:
        writer = csv.writer(stream)
        writer.writerow(["arm", "seed", *summary["metrics"], "load_average_end_1_5_15", "folder"])
        for run in runs:
            row = [run["arm"], run["seed"], *(dict((k, r(run)) for k, _, r in METRICS)[k] for k in summary["metrics"])]
            writer.writerow(row + [" ".join(f"{v:.2f}" for v in run["load_average_end"] or ()), run["folder"]])
    with replaced(os.path.join(output_dir, "summary.csv")) as stream:
        writer = csv.writer(stream)
        writer.writerow(["kind", "name", "metric", "n", "mean", "std", "ci_low", "ci_high", "ci_undefined"])
        for row in summary["arms"]:
            writer.writerow(["arm", row["arm"], row["metric"], row["n"], row["mean"], row["std"], "", "", ""])
        for row in summary["pairs"]:
            writer.writerow(
                [
                    "difference",
                    row["pair"],
                    row["metric"],
                    row["n"],
                    row["mean"],
                    row["std"],
                    row["ci_low"],
                    row["ci_high"],
                    row["ci_undefined"] or "",
                ]
            )
    results = {
        "grid": grid,
        "runs": [{k: v for k, v in run.items() if k != "test"} | {m: r(run) for m, _, r in METRICS} for run in runs],
        **summary,
    }
    atomic.write_json(os.path.join(output_dir, "results.json"), results)
    plot(summary, os.path.join(output_dir, "comparison.png"))


@contextlib.contextmanager
def replaced(path):
    """A text stream whose content replaces `path` whole when the block ends: two compare.py processes
    on one grid never leave a mixture of both tables."""
    with atomic.replacing(path) as partial, open(partial, "w", newline="", encoding="utf-8") as stream:
        yield stream


def plot(summary, path):
    """One panel per metric: each seed's value per arm (seeds joined across arms), the mean and ± std."""
    headers = {key: header for key, header, _ in METRICS}
    keys = summary["metrics"]
    columns = min(len(keys), 3)
    rows_of_panels = math.ceil(len(keys) / columns)
    figure = Figure(figsize=(3.6 * columns, 3.2 * rows_of_panels))
    axes = figure.subplots(rows_of_panels, columns, squeeze=False)
    for axis in axes.flat[len(keys) :]:
        axis.set_visible(False)
    for axis, key in zip(axes.flat, keys):
        rows = [row for row in summary["arms"] if row["metric"] == key]
        seeds = sorted({seed for row in rows for seed in row["per_seed"]})
        for seed in seeds:
            points = [(x, row["per_seed"][seed]) for x, row in enumerate(rows) if seed in row["per_seed"]]
            axis.plot(*zip(*points), "o-", color="0.6", alpha=0.6, markersize=4, linewidth=0.8)
        axis.errorbar(
            range(len(rows)),
            [row["mean"] for row in rows],
            yerr=[0 if math.isnan(row["std"]) else row["std"] for row in rows],
            fmt="D",
            color="C3",
            capsize=6,
            markersize=7,
            label="mean ± std",
        )
        axis.set_xticks(range(len(rows)), [row["arm"] for row in rows])
        axis.set_xlim(-0.5, len(rows) - 0.5)
        axis.set_title(headers[key], fontsize=9)
    axes[0][0].legend(fontsize=8)
    figure.suptitle("grey: one seed across arms", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    logs.setup_single_process()
    output_dir = args.output_dir
    grid_path = os.path.join(output_dir, GRID_FILE)
    if args.table_only and args.arm is None and args.config is None:
        if not os.path.exists(grid_path):
            raise UserError(
                f"'{output_dir}' holds no {GRID_FILE}: it is not a compare.py grid folder. Pass the "
                f"--output-dir of an earlier compare.py run, or give --config and --arm as for that run."
            )
        grid = read_json(
            grid_path,
            grid_problem,
            "Delete it and rebuild the table with --config and --arm as you ran the grid, plus --table-only.",
        )
        grid["seeds"] = checked_seeds(args.seeds if args.seeds is not None else grid["seeds"])
    else:
        grid = define_grid(args)
    if not args.table_only:
        refuse_other_runs(grid, output_dir)
        try:
            os.makedirs(output_dir, exist_ok=True)
            atomic.write_json(grid_path, grid)
        except OSError as error:
            raise UserError(
                f"Cannot write to --output-dir '{output_dir}' ({error.strerror or error}). Choose a writable folder."
            ) from None
        try:
            run_grid(grid, output_dir)
        except KeyboardInterrupt:
            raise UserError("Grid stopped by Ctrl-C between runs. Rerun the same command to continue.") from None
    runs, left_out = collect_runs(grid, output_dir)
    for folder, reason in left_out:
        logger.warning("not in the table: %s %s", folder, reason)
    if not runs:
        raise UserError(
            f"No finished runs of this grid in '{output_dir}' (see the reasons above). Run the grid first, "
            f"without --table-only."
        )
    summary = summarise(grid, runs)
    table = format_table(summary)
    write_outputs(output_dir, grid, runs, summary, table)
    logger.info("%s\nWritten to %s: table.txt, runs.csv, summary.csv, results.json, comparison.png", table, output_dir)
    return summary


if __name__ == "__main__":
    main()
