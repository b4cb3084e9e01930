"""Fault injection: signals, killed jobs and ranks, divergence, and bad input.

Each fault must end in a clean recovery (a resumed run finishes with exactly the weights of an
uninterrupted one) or in one clear message with a non-zero exit, never a hang or a traceback.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

from rdrop import checkpoint
from rdrop.preemption import STOPPED_EXIT_CODE

import paddle
import psutil
import pytest
from cifar_archive import write_cifar100_archive
from run_helpers import ROOT, assert_same_weights, final_weights, launch, launch_command, tiny_config

import train

LONG_RUN = {
    "schedule": {"total_steps": 40, "warmup_steps": 2},
    "train": {"log_every": 1, "save_every": 5, "eval_every": 0},
}


def long_config(tmp_path, archive, name, **extra):
    sections = {section: dict(values) for section, values in LONG_RUN.items()}
    for section, values in extra.items():
        sections.setdefault(section, {}).update(values)
    return tiny_config(tmp_path, archive, name, **sections)


def wait_for_text(log_path, text, process, timeout=120):
    """Block until the run's log contains `text` (the run must still be going)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(log_path) and text in open(log_path).read():
            return
        assert process.poll() is None, f"the run ended before its log showed {text!r}"
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the log after {timeout} s")


def wait_for_step(log_path, step, process, timeout=120):
    """Block until the run's log shows optimizer step `step` (the run must still be going)."""
    wait_for_text(log_path, f"step {step}/", process, timeout)


def start_single(config_path, *overrides):
    return subprocess.Popen(
        [sys.executable, "train.py", "--config", config_path, *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def start_launched(config_path, log_dir, *overrides):
    return subprocess.Popen(
        launch_command(["--config", config_path, *overrides], log_dir),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def worker_of_rank(job, rank):
    """The training process of `rank` under the launcher `job`."""
    workers = [w for w in psutil.Process(job.pid).children() if w.environ().get("PADDLE_TRAINER_ID") == str(rank)]
    assert len(workers) == 1
    return workers[0]


def worker_logs(log_dir):
    return "".join(
        open(os.path.join(log_dir, name)).read() for name in sorted(os.listdir(log_dir)) if name.startswith("workerlog")
    )


def run_single(config_path, *overrides):
    """A whole run in a fresh process, as a user runs it. (Within the test process, MKL may already
    have picked its kernels before rdrop.runtime set them, which changes rounding.)"""
    process = start_single(config_path, *overrides)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err


def stop_a_single_run_mid_training(tmp_path, archive, name, signum):
    """A one-process run of 40 steps sent `signum` after step 7: it must save a checkpoint before the
    end and exit 75. Returns its config path and console output."""
    config_path = long_config(tmp_path, archive, name)
    process = start_single(config_path)
    wait_for_step(tmp_path / name / "train.log", 7, process)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == STOPPED_EXIT_CODE, err
    stopped_at, _ = checkpoint.list_checkpoints(str(tmp_path / name))[-1]
    assert 7 <= stopped_at < 40
    return config_path, out


@pytest.mark.slow
def test_sigterm_checkpoints_exits_stopped_and_resumes_exactly(tmp_path, archive):
    run_single(long_config(tmp_path, archive, "reference"))
    _, reference = final_weights(tmp_path / "reference")

    config_path, out = stop_a_single_run_mid_training(tmp_path, archive, "stopped", signal.SIGTERM)
    assert "Stopped by SIGTERM" in out

    run_single(config_path, "-o", "train.resume=auto")
    step, resumed = final_weights(tmp_path / "stopped")
    assert step == 40
    assert_same_weights(reference, resumed)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def assert_stopped_during_start_up(process, signum):
    out, err = process.communicate(timeout=120)
    assert process.returncode == STOPPED_EXIT_CODE, err
    assert f"Stopped by {signum.name} during start-up" in out + err
    assert "FatalError" not in err and "Traceback" not in err


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda signum: signum.name)
def test_a_signal_during_start_up_ends_the_run_at_once_and_cleanly(tmp_path, archive, signum):
    """Until the loop starts, Paddle's C++ handler used to take SIGTERM: a FatalError dump, exit 143, and
    now and then a deadlock. The signal is sent once the run has written its config, mid start-up."""
    config_path = long_config(tmp_path, archive, "starting")
    process = start_single(config_path)
    while not (tmp_path / "starting" / "config.yaml").exists():
        assert process.poll() is None
        time.sleep(0.01)
    process.send_signal(signum)
    assert_stopped_during_start_up(process, signum)
    assert not any(name.endswith(".partial") for _, _, names in os.walk(tmp_path / "starting") for name in names)


def paddle_library_loaded(pid):
    """Whether the process has mapped Paddle's C++ library, which `import paddle` loads early on."""
    with open(f"/proc/{pid}/maps") as maps:
        return "libpaddle" in maps.read()


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda signum: signum.name)
def test_a_signal_while_paddle_is_imported_ends_the_run_cleanly(tmp_path, archive, signum):
    process = start_single(long_config(tmp_path, archive, "importing"))
    while not paddle_library_loaded(process.pid):
        assert process.poll() is None
        time.sleep(0.001)
    process.send_signal(signum)
    assert_stopped_during_start_up(process, signum)
    assert not (tmp_path / "importing" / "config.yaml").exists()


@pytest.mark.slow
def test_sighup_checkpoints_and_exits_stopped(tmp_path, archive):
    stop_a_single_run_mid_training(tmp_path, archive, "hung_up", signal.SIGHUP)
    assert "Stopped by SIGHUP at step" in (tmp_path / "hung_up" / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=lambda signum: signum.name)
def test_a_signal_during_the_final_test_evaluation_stops_it(tmp_path, signum):
    """10,000 test images one at a time: the final test evaluation takes far longer than stopping."""
    archive = write_cifar100_archive(tmp_path / "big_test.tar.gz", num_train=48, num_test=10_000)
    config_path = tiny_config(tmp_path, archive, "testing", data={"val_size": 8}, eval={"batch_size": 1})
    process = start_single(config_path)
    while not checkpoint.list_checkpoints(str(tmp_path / "testing")) or (
        checkpoint.list_checkpoints(str(tmp_path / "testing"))[-1][0] < 6
    ):
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == STOPPED_EXIT_CODE, err
    log = (tmp_path / "testing" / "train.log").read_text()
    assert f"Stopped by {signum.name} during the final test evaluation" in log
    assert "Test split, weights of the last step" not in log and "Traceback" not in err
    if signum == signal.SIGTERM:  # as the message says, resuming runs the evaluation (in larger batches)
        run_single(config_path, "-o", "train.resume=auto", "-o", "eval.batch_size=500")
        log = (tmp_path / "testing" / "train.log").read_text()
        assert "Test split, weights of the last step (6)" in log


@pytest.mark.slow
def test_two_process_job_survives_sigterm_and_sigkill(tmp_path, archive):
    reference = launch(["--config", long_config(tmp_path, archive, "reference")], tmp_path / "reference_logs")
    assert reference.returncode == 0, reference.stdout + reference.stderr
    _, reference_weights = final_weights(tmp_path / "reference")

    # SIGTERM to the launcher: it forwards the signal, the workers agree, save and exit cleanly.
    config_path = long_config(tmp_path, archive, "terminated")
    job = start_launched(config_path, tmp_path / "term_logs")
    wait_for_step(tmp_path / "terminated" / "train.log", 7, job)
    job.send_signal(signal.SIGTERM)
    job.communicate(timeout=120)
    assert job.returncode == signal.SIGTERM  # the launcher's own code when it is signalled (docs/faults.md)
    assert "Stopped by" in (tmp_path / "terminated" / "train.log").read_text()
    stopped_at = checkpoint.list_checkpoints(str(tmp_path / "terminated"))[-1][0]
    assert 7 <= stopped_at < 40
    resumed = launch(["--config", config_path, "-o", "train.resume=auto"], tmp_path / "term_resume_logs")
    assert resumed.returncode == 0, worker_logs(tmp_path / "term_resume_logs")
    assert_same_weights(reference_weights, final_weights(tmp_path / "terminated")[1])

    # SIGTERM to one worker only: the ranks agree to stop, and the launcher passes on the workers' exit
    # code, which must not be 0 (a scheduler would take the job as finished).
    config_path = long_config(tmp_path, archive, "one_terminated")
    job = start_launched(config_path, tmp_path / "one_term_logs")
    wait_for_step(tmp_path / "one_terminated" / "train.log", 7, job)
    worker_of_rank(job, 1).send_signal(signal.SIGTERM)
    job.communicate(timeout=120)
    assert job.returncode == STOPPED_EXIT_CODE
    assert "Stopped by a signal on another rank" in (tmp_path / "one_terminated" / "train.log").read_text()
    assert checkpoint.list_checkpoints(str(tmp_path / "one_terminated"))[-1][0] < 40

    # SIGKILL of the whole job: no chance to save; resume continues from the last periodic checkpoint.
    config_path = long_config(tmp_path, archive, "killed")
    job = start_launched(config_path, tmp_path / "kill_logs")
    wait_for_step(tmp_path / "killed" / "train.log", 13, job)
    os.killpg(job.pid, signal.SIGKILL)
    job.communicate(timeout=60)
    assert checkpoint.list_checkpoints(str(tmp_path / "killed"))[-1][0] in (10, 15)
    resumed = launch(["--config", config_path, "-o", "train.resume=auto"], tmp_path / "kill_resume_logs")
    assert resumed.returncode == 0, worker_logs(tmp_path / "kill_resume_logs")
    assert_same_weights(reference_weights, final_weights(tmp_path / "killed")[1])


@pytest.mark.slow
def test_losing_one_rank_ends_the_job_with_a_message_and_resume_works(tmp_path, archive):
    config_path = long_config(tmp_path, archive, "lost")
    log_dir = tmp_path / "logs"
    job = start_launched(config_path, log_dir)
    wait_for_step(tmp_path / "lost" / "train.log", 6, job)
    # A frozen rank is named (on the console and in train.log) long before gloo's timeout blames a peer.
    rank_one = worker_of_rank(job, 1)
    rank_one.suspend()
    wait_for_text(tmp_path / "lost" / "train.log", f"error: rank 1 (pid {rank_one.pid}) has been stopped", job)
    rank_one.resume()
    rank_zero = worker_of_rank(job, 0)  # the launcher shows only rank 0's log: the hard case
    rank_zero.kill()
    started = time.monotonic()
    out, err = job.communicate(timeout=120)
    assert job.returncode != 0
    assert time.monotonic() - started < 60
    # Whichever notices first names rank 0: this machine's worker watch (its process is gone) or rank 1
    # itself, when gloo aborts it inside a collective (rdrop/output_relay.py).
    diagnoses = (
        f"error: rank 0 (pid {rank_zero.pid}) exited while rank 1 still needed it",
        "error: rank 1 lost its connection to rank 0 inside a collective operation",
    )
    assert any(diagnosis in out + err for diagnosis in diagnoses), out + err
    assert f"error: rank 1 (pid {rank_one.pid}) has been stopped" in out + err
    log = (tmp_path / "lost" / "train.log").read_text()
    assert any(diagnosis in log for diagnosis in diagnoses), log
    resumed = launch(["--config", config_path, "-o", "train.resume=auto"], tmp_path / "resume_logs")
    assert resumed.returncode == 0, worker_logs(tmp_path / "resume_logs")
    assert final_weights(tmp_path / "lost")[0] == 40


def test_divergence_skips_steps_then_stops_and_never_saves_a_broken_best(tmp_path, archive, capsys):
    config_path = tiny_config(
        tmp_path,
        archive,
        "diverged",
        optimizer={"lr": 1e30, "grad_clip": None},
        train={"max_bad_steps": 3, "eval_every": 1, "log_every": 1},
        schedule={"warmup_steps": 0, "total_steps": 20, "name": "constant"},
    )
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", config_path])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Training diverged: 3 consecutive steps" in err and "Traceback" not in err
    log = (tmp_path / "diverged" / "train.log").read_text()
    assert log.count("update skipped") == 3
    best = tmp_path / "diverged" / "best.json"
    if best.exists():
        import json

        assert json.loads(best.read_text())["step"] == 1  # only the one finite evaluation may be best


def test_unwritable_output_dir_is_a_clear_error(tmp_path, archive, capsys):
    (tmp_path / "file").write_text("")
    config_path = tiny_config(tmp_path, archive, "x", train={"output_dir": str(tmp_path / "file" / "run")})
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", config_path])
    assert exit_info.value.code == 2
    assert "Cannot create train.output_dir" in capsys.readouterr().err


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.ENOLCK])
def test_an_output_dir_without_file_locks_is_one_paragraph_naming_the_way_to_run_anyway(
    tmp_path, archive, capsys, monkeypatch, code
):
    """Lustre without flock answers ENOSYS, NFSv3 with nolock ENOLCK: not "cannot create or write"."""

    def no_locks(stream, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("rdrop.output_folder.fcntl.flock", no_locks)
    config_path = tiny_config(tmp_path, archive, "nolocks")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", config_path])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "Traceback" not in err
    assert "does not support file locks" in err and errno.errorcode[code] in err
    assert "-o train.lock_output_dir=false" in err and "Cannot create" not in err


def bad_archive(tmp_path, **knobs):
    return write_cifar100_archive(tmp_path / "bad.tar.gz", num_train=48, num_test=21, **knobs)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("malformed_yaml", "is not valid YAML"),
        ("object_tag", "uses a YAML tag"),
        ("unknown_key", "Did you mean 'optimizer.lr'"),
        ("negative_lr", "Invalid value -0.1 for 'optimizer.lr'"),
        ("crop_scale", "'data.crop_scale'"),
        ("indivisible_batch", "must be a multiple of train.micro_batch_size"),
        ("missing_archive", "download"),
        ("truncated_archive", "bad.tar.gz"),
        ("missing_member", "bad.tar.gz"),
        ("label_out_of_range", "bad.tar.gz"),
        ("test_split_missing_with_val_selection", "cifar-100-python/test"),
        ("global_batch_over_the_training_set", "larger than the training set (48 images)"),
        ("seed_beyond_64_bits", "'train.seed'"),
    ],
)
def test_bad_input_exits_2_with_one_paragraph_and_no_traceback(tmp_path, archive, capsys, case, expected):
    overrides = []
    config_path = tiny_config(tmp_path, archive)
    if case == "malformed_yaml":
        (tmp_path / "run.yaml").write_text("model: {name: vit\n")
    elif case == "object_tag":
        (tmp_path / "run.yaml").write_text("model: !!python/object/apply:os.system ['echo hi']\n")
    elif case == "unknown_key":
        overrides = ["optimizer.lrr=0.1"]
    elif case == "negative_lr":
        overrides = ["optimizer.lr=-0.1"]
    elif case == "crop_scale":
        overrides = ["data.crop_scale=[0.0,1.0]"]
    elif case == "indivisible_batch":
        overrides = ["train.micro_batch_size=3"]
    elif case == "missing_archive":
        overrides = [f"data.data_file={tmp_path / 'absent.tar.gz'}"]
    elif case == "truncated_archive":
        overrides = [f"data.data_file={bad_archive(tmp_path, truncate_to_bytes=2000)}"]
    elif case == "missing_member":
        overrides = [f"data.data_file={bad_archive(tmp_path, omit_members=('test',))}"]
    elif case == "global_batch_over_the_training_set":
        overrides = ["train.global_batch_size=1000000000"]
    elif case == "seed_beyond_64_bits":
        overrides = [f"train.seed={2**64}"]
    elif case == "test_split_missing_with_val_selection":  # the test split is only used after the last step
        overrides = [f"data.data_file={bad_archive(tmp_path, omit_members=('test',))}", "data.val_size=8"]
    elif case == "label_out_of_range":
        out_of_range = {"train": {3: 150}}
        overrides = [f"data.data_file={bad_archive(tmp_path, label_overrides=out_of_range)}"]
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", config_path] + [arg for override in overrides for arg in ("-o", override)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert expected in err and "Traceback" not in err
    assert err.startswith("error: ") and err.strip().count("\n") == 0
    assert not checkpoint.list_checkpoints(str(tmp_path / "run"))  # refused before any training


def test_the_command_line_itself_prints_no_traceback(tmp_path):
    (tmp_path / "bad.yaml").write_text("optimizer:\n  lr: fast\n")
    result = subprocess.run(
        [sys.executable, "train.py", "--config", str(tmp_path / "bad.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Invalid value 'fast' for 'optimizer.lr'" in result.stderr and "Traceback" not in result.stderr


def test_resume_auto_starting_fresh_never_overwrites_best_weights(tmp_path, archive, capsys):
    """A run stopped after an evaluation but before its first checkpoint left only best.pdparams."""
    config_path = tiny_config(tmp_path, archive, "early")
    run = tmp_path / "early"
    checkpoint.save_best(str(run), {"w": paddle.ones([2])}, {"top1": 50.0, "step": 3})
    before = {name: (run / name).read_bytes() for name in ("best.pdparams", "best.json")}
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", config_path, "-o", "train.resume=auto"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and err.strip().count("\n") == 0
    assert "best.pdparams" in err and "train.overwrite=true" in err
    assert {name: (run / name).read_bytes() for name in before} == before


@pytest.mark.slow
def test_a_second_run_on_a_busy_output_dir_exits_2_naming_the_first(tmp_path, archive, capsys):
    config_path = long_config(tmp_path, archive, "busy")
    first = start_single(config_path, "-o", "train.resume=auto")
    wait_for_step(tmp_path / "busy" / "train.log", 2, first)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", config_path, "-o", "train.resume=auto"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and err.strip().count("\n") == 0
    assert f"in use by another training run (host {socket.gethostname()}, pid {first.pid})" in err
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert [step for step, _ in checkpoint.list_checkpoints(str(tmp_path / "busy"))][-1] == 40


def run_in_process(config_path, *overrides, capsys):
    """(exit code, stderr) of train.main in this process."""
    try:
        train.main(["--config", config_path] + [arg for override in overrides for arg in ("-o", override)])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def test_resume_shows_config_changes_and_refuses_those_that_change_the_run(tmp_path, archive, capsys):
    config_path = tiny_config(tmp_path, archive, "run")
    assert run_in_process(config_path, capsys=capsys)[0] == 0
    written = (tmp_path / "run" / "config.yaml").read_text()

    code, err = run_in_process(config_path, "train.resume=auto", "train.seed=5", "data.val_size=4", capsys=capsys)
    assert code == 2 and "Traceback" not in err
    assert "train.seed: 0 -> 5" in err and "data.val_size: 0 -> 4" in err
    assert "train.resume_changes=[data.val_size,train.seed]" in err
    assert (tmp_path / "run" / "config.yaml").read_text() == written

    code, err = run_in_process(
        config_path, "train.resume=auto", "optimizer.name=adamw", "train.resume_changes=[optimizer.name]", capsys=capsys
    )
    assert code == 2 and "optimizer.name: 'momentum' -> 'adamw'" in err and "Traceback" not in err

    code, err = run_in_process(
        config_path,
        "train.resume=auto",
        "train.seed=5",
        "train.log_every=1",
        "train.resume_changes=[train.seed]",
        capsys=capsys,
    )
    assert code == 0, err
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Resuming with changes to the checkpoint's config: train.seed: 0 -> 5; train.log_every: 2 -> 1" in log
    assert "seed: 5" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.parametrize(
    "field, value",
    [("step", 40.7), ("step", 10**30), ("step", -5), ("step", True), ("top1", "x"), ("top1", float("nan"))],
)
def test_an_edited_trainer_state_stops_the_resume_before_anything_is_trained(tmp_path, archive, capsys, field, value):
    config_path = tiny_config(tmp_path, archive, "run")
    assert run_in_process(config_path, capsys=capsys)[0] == 0
    folder = tmp_path / "run" / "checkpoints" / "step_3"
    state_file = folder / checkpoint.STATE_FILE
    state = json.loads(state_file.read_text())
    (state["best"] if field == "top1" else state)[field] = value
    state_file.write_text(json.dumps(state))
    run_files = {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()}

    code, err = run_in_process(config_path, f"train.resume={folder}", capsys=capsys)
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0
    assert f"Checkpoint file '{state_file}' " in err
    assert {path: path.read_bytes() for path in (tmp_path / "run").rglob("*") if path.is_file()} == run_files


def test_settings_that_waste_the_run_are_reported_and_the_largest_seed_runs_to_the_end(tmp_path, archive):
    cores = len(os.sched_getaffinity(0))
    config_path = tiny_config(
        tmp_path,
        archive,
        "warned",
        schedule={"warmup_steps": 500, "total_steps": 6},
        train={"cpu_threads": cores + 1, "seed": 2**31 - 1},
    )
    process = start_single(config_path)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err  # the end of the run (VisualDL hyper-parameters) takes the seed
    log = (tmp_path / "warned" / "train.log").read_text()
    assert "schedule.warmup_steps (500) is larger than schedule.total_steps (6)" in log
    assert f"at most {0.05 * 6 / 500:.3g} (1% of optimizer.lr)" in log
    assert f"train.cpu_threads {cores + 1} x 1 process(es)" in err


@pytest.mark.slow
def test_a_killed_data_loading_worker_is_one_paragraph_and_exit_2(tmp_path, archive):
    config_path = long_config(tmp_path, archive, "workers", data={"num_workers": 2}, schedule={"total_steps": 400})
    process = start_single(config_path)
    wait_for_step(tmp_path / "workers" / "train.log", 3, process)
    workers = [child for child in psutil.Process(process.pid).children() if "train.py" in " ".join(child.cmdline())]
    assert workers
    workers[0].kill()
    out, err = process.communicate(timeout=120)
    assert process.returncode == 2, err
    # Paddle's SIGCHLD handler may raise inside a logging call, which prints a "Logging error" block
    # before the run goes on to the next read: the run's own last word is the one paragraph.
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith("error: a data-loading worker process died") and "data.num_workers" in last_line
