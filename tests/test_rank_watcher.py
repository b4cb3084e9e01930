"""The rank watcher names a dead or stopped worker, and the lowest surviving rank tells the console and train.log.

Plain `sleep` processes stand in for the launcher and the workers: the watcher only looks at processes.
"""

import signal
import subprocess
import threading
import time

from rdrop import rank_watcher

import pytest


@pytest.fixture
def processes(tmp_path):
    """start(stderr=None) -> a `sleep` process; all are killed at the end."""
    started = []

    def start(stderr=None):
        process = subprocess.Popen(["sleep", "60"], stderr=stderr)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()
        process.wait()


def watch_in_background(*args):
    thread = threading.Thread(target=rank_watcher.main, args=args, daemon=True)
    thread.start()
    return thread


def wait_for_text(path, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"nothing written to {path}")


def test_dead_rank_zero_is_reported_on_the_console_and_in_train_log(tmp_path, processes, capsys):
    console = processes(stderr=(tmp_path / "console").open("w"))
    own, rank_zero = processes(), processes()
    log_file = tmp_path / "train.log"
    watcher = watch_in_background("1", own.pid, console.pid, str(log_file), [f"0:{rank_zero.pid}"])
    rank_zero.kill()
    watcher.join(timeout=30)
    expected = f"error: rank 0 (pid {rank_zero.pid}) exited while rank 1 still needed it"
    assert expected in wait_for_text(tmp_path / "console")
    assert expected in log_file.read_text()
    assert expected in capsys.readouterr().err


def test_only_the_lowest_survivor_reports_to_the_console(tmp_path, processes, capsys):
    console = processes(stderr=(tmp_path / "console").open("w"))
    own, rank_zero, rank_one = processes(), processes(), processes()
    log_file = tmp_path / "train.log"
    siblings = [f"0:{rank_zero.pid}", f"1:{rank_one.pid}"]
    watcher = watch_in_background("2", own.pid, console.pid, str(log_file), siblings)
    rank_zero.kill()
    watcher.join(timeout=30)
    assert "error: rank 0" in capsys.readouterr().err  # rank 2's own log
    assert (tmp_path / "console").read_text() == "" and not log_file.exists()  # rank 1 speaks there


def test_a_stopped_rank_is_named(tmp_path, processes, monkeypatch):
    monkeypatch.setattr(rank_watcher, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(rank_watcher, "FROZEN_SECONDS", 0.2)
    console = processes(stderr=(tmp_path / "console").open("w"))
    own, rank_zero, rank_one = processes(), processes(), processes()
    rank_one.send_signal(signal.SIGSTOP)
    siblings = [f"0:{rank_zero.pid}", f"1:{rank_one.pid}"]
    watcher = watch_in_background("0", own.pid, console.pid, str(tmp_path / "train.log"), siblings)
    text = wait_for_text(tmp_path / "console")
    assert f"rank 1 (pid {rank_one.pid}) has been stopped" in text and "rank 0 (" not in text
    own.kill()  # the watched worker ends: the watcher ends with it
    watcher.join(timeout=30)
    assert not watcher.is_alive()
    rank_one.send_signal(signal.SIGCONT)


def test_a_suspended_job_is_not_reported_as_a_frozen_rank(tmp_path, processes, monkeypatch, capsys):
    monkeypatch.setattr(rank_watcher, "POLL_SECONDS", 0.05)
    monkeypatch.setattr(rank_watcher, "FROZEN_SECONDS", 0.2)
    console = processes(stderr=(tmp_path / "console").open("w"))
    own, rank_one = processes(), processes()
    for process in (own, rank_one):  # Ctrl-Z stops every process of the job
        process.send_signal(signal.SIGSTOP)
    watcher = watch_in_background("0", own.pid, console.pid, str(tmp_path / "train.log"), [f"1:{rank_one.pid}"])
    time.sleep(1.0)  # five times FROZEN_SECONDS: a single frozen rank would have been reported by now
    own.kill()
    watcher.join(timeout=30)
    assert (tmp_path / "console").read_text() == "" and capsys.readouterr().err == ""
    rank_one.send_signal(signal.SIGCONT)
