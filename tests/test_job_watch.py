"""Several machines: a failure on any rank ends every rank, on every node, with its reason.

The slow tests start two launchers on this host (`--nnodes 2`), which behave as two machines; a mount
namespace with a small tmpfs over the output folder gives node 0 a disk of its own that fills up.
"""

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from rdrop import job_watch, output_relay
from rdrop.errors import PEER_LOST_EXIT_CODE, USER_ERROR_EXIT_CODE, UserError

import psutil
import pytest
from run_helpers import ROOT

# What either node may print in place of a paragraph when something goes wrong underneath.
RAW_FAILURES = ("Traceback", "FatalError", "terminate called")
HANG_GUARD = max(job_watch.SILENCE_SECONDS + job_watch.HEARTBEAT_SECONDS, job_watch.JOINING_SECONDS) + 60
QUICK_RUN = [
    "--config",
    "configs/quickstart.yaml",
    "-o",
    "schedule.total_steps=200",
    "-o",
    "train.log_every=1",
    "-o",
    "train.eval_every=0",
    "-o",
    "train.save_every=5",
]


class _Context:
    def __init__(self, rank, world_size):
        self.rank, self.world_size, self.is_main = rank, world_size, rank == 0


def test_gloo_abort_becomes_one_paragraph_naming_the_lost_rank(tmp_path):
    log_file = tmp_path / "train.log"
    log_file.write_text("")
    worker_output = (
        b"step 6/200 ...\n"
        b"terminate called after throwing an instance of 'gloo::IoException'\n"
        b"  what():  [pair.cc:576] Read error [127.0.0.1]:4242: Connection reset by peer\n"
        b"C++ Traceback (most recent call last):\n"
        b"FatalError: `Process abort signal` is detected by the operating system.\n"
    )
    console = io.BytesIO()
    output_relay.relay(io.BytesIO(worker_output), console, 1, 2, str(log_file))
    lines = console.getvalue().decode().splitlines()
    assert lines[0] == "step 6/200 ..."
    assert len(lines) == 2 and lines[1].startswith("error: rank 1 lost its connection to rank 0")
    assert "Connection reset by peer" in lines[1] and "train.resume=auto" in lines[1]
    assert not any(raw in lines[1] for raw in ("terminate called", "FatalError"))
    assert log_file.read_text() == lines[1] + "\n"  # rank 0 is the lost one: rank 1 speaks in train.log


def test_the_relay_never_writes_through_a_link_planted_at_train_log(tmp_path):
    target = tmp_path / "someone_elses_file"
    target.write_text("theirs\n")
    log_file = tmp_path / "train.log"
    log_file.symlink_to(target)
    worker_output = b"terminate called after throwing an instance of 'gloo::IoException'\n  what():  reset\n"
    console = io.BytesIO()
    output_relay.relay(io.BytesIO(worker_output), console, 1, 2, str(log_file))
    assert console.getvalue().decode().startswith("error: rank 1 lost its connection to rank 0")
    assert target.read_text() == "theirs\n"


def test_output_without_an_abort_passes_unchanged_and_train_log_is_left_alone(tmp_path):
    output = b"a line\n[rank 2] WARNING something\nno newline at the end"
    console = io.BytesIO()
    assert output_relay.relay(io.BytesIO(output), console, 2, 4, str(tmp_path / "train.log")) is None
    assert console.getvalue() == output and not (tmp_path / "train.log").exists()


def test_start_up_failure_on_one_rank_stops_every_rank_with_its_paragraph(monkeypatch):
    reports = [(None, "host-a"), (("Dataset file missing on this machine.", 2), "host-b")]
    monkeypatch.setattr(job_watch.distributed, "gather", lambda value, context: reports)
    with pytest.raises(job_watch.JobStop) as stopped:
        with job_watch.all_or_none(_Context(0, 2)):
            pass
    assert str(stopped.value) == "rank 1 (host host-b) stopped: Dataset file missing on this machine."
    assert stopped.value.exit_code == USER_ERROR_EXIT_CODE

    def gather_own(value, context):  # the failing rank sees its own report among the others
        return [(None, "host-a"), value]

    monkeypatch.setattr(job_watch.distributed, "gather", gather_own)
    with pytest.raises(job_watch.JobStop) as stopped:
        with job_watch.all_or_none(_Context(1, 2)):
            raise UserError("Dataset file\n  missing.")
    assert str(stopped.value) == "Dataset file missing."


def join_as(monkeypatch, rank, configure, other_outcome):
    """job_watch.join on `rank` of 2, the other rank's outcome of its settings being `other_outcome`."""
    monkeypatch.setattr(job_watch.distributed, "init", lambda: _Context(rank, 2))
    monkeypatch.setattr(job_watch, "_start_joining_deadline", lambda: None)

    def gather(value, context):
        other = (other_outcome, "host-other")
        return [value, other] if rank == 0 else [other, value]

    monkeypatch.setattr(job_watch.distributed, "gather", gather)
    return job_watch.join(configure)


def refuse_config():
    raise UserError("Config file 'c.yaml' does not exist.")


def crash():
    raise KeyError("oops")


def test_settings_that_fail_on_one_rank_end_every_rank_after_joining(monkeypatch):
    assert join_as(monkeypatch, 0, lambda: "settings", None)[0] == "settings"
    with pytest.raises(job_watch.JobStop) as stopped:
        join_as(monkeypatch, 0, lambda: "settings", ("Config file 'c.yaml' does not exist.", 2))
    assert str(stopped.value) == "rank 1 (host host-other) stopped: Config file 'c.yaml' does not exist."
    with pytest.raises(UserError, match="^Config file 'c.yaml' does not exist.$"):  # its own paragraph
        join_as(monkeypatch, 1, refuse_config, None)
    with pytest.raises(KeyError):  # a crash keeps its traceback on its own rank
        join_as(monkeypatch, 1, crash, None)


def test_the_other_ranks_learn_of_a_crash_and_of_a_refused_command_line(monkeypatch):
    told = []
    monkeypatch.setattr(job_watch, "_agree", lambda failure, context: told.append(failure))
    monkeypatch.setattr(job_watch.distributed, "init", lambda: _Context(1, 2))
    monkeypatch.setattr(job_watch, "_start_joining_deadline", lambda: None)

    def refuse_command_line():
        raise SystemExit(2)  # as argparse does, after printing the usage

    for configure in (crash, refuse_command_line):
        with pytest.raises((KeyError, SystemExit)):
            job_watch.join(configure)
    assert told[0] == ("crashed with KeyError: 'oops' (its traceback is in its log)", job_watch.CRASH_EXIT_CODE)
    assert told[1][1] == 2 and "command line was refused" in told[1][0]


class _MemoryStore:
    """The store's counters and events in a dict, as Paddle's TCPStore would hold them."""

    def __init__(self):
        self.values, self.events_posted = {}, []

    def counter(self, name, increment=0):
        self.values[name] = self.values.get(name, 0) + increment
        return self.values[name]

    def post(self, event):
        self.events_posted.append(event)
        return self.counter("events", 1)

    def events(self, first, last):
        return self.events_posted[first - 1 : last]


def watch_with(monkeypatch, rank, world_size, store):
    monkeypatch.setattr(job_watch, "HEARTBEAT_SECONDS", 0.05)
    monkeypatch.setattr(job_watch, "SILENCE_SECONDS", 0.5)
    monkeypatch.setattr(job_watch.distributed, "gather", lambda value, context: [f"h{r}" for r in range(world_size)])
    monkeypatch.setattr(job_watch, "_Store", lambda endpoint, size: store)
    monkeypatch.setattr(job_watch, "_start_rank_watcher", lambda context, log_file: None)
    exits = []
    ended = threading.Event()

    def record_exit(message, exit_code):
        exits.append((message, exit_code))
        ended.set()

    monkeypatch.setattr(job_watch.JobWatch, "_exit", lambda self, message, code: record_exit(message, code))
    return job_watch.JobWatch(_Context(rank, world_size), "unused:0", "unused.log"), exits, ended


def test_rank_zero_posts_a_silent_rank_as_lost_and_ends(monkeypatch):
    store = _MemoryStore()
    watch, exits, ended = watch_with(monkeypatch, 0, 3, store)
    deadline = time.monotonic() + 30
    while not ended.is_set() and time.monotonic() < deadline:  # rank 2 beats, rank 1 has gone silent
        store.counter("beat/2", 1)
        time.sleep(0.05)
    watch.stop()
    assert [event["rank"] for event in store.events_posted] == [1]
    message, code = exits[0]
    assert code == PEER_LOST_EXIT_CODE
    assert message.startswith("error: rank 1 has not been heard from") and "host h1" in message


def test_a_done_rank_is_not_taken_for_a_lost_one(monkeypatch):
    store = _MemoryStore()
    store.counter("done/1", 1)
    watch, exits, ended = watch_with(monkeypatch, 0, 2, store)
    assert not ended.wait(2.0)  # four times SILENCE_SECONDS
    watch.stop()
    assert exits == [] and store.events_posted == []


def test_a_peer_s_posted_reason_ends_this_rank_with_its_exit_code(monkeypatch):
    store = _MemoryStore()
    watch, exits, ended = watch_with(monkeypatch, 1, 2, store)
    store.post({"rank": 0, "exit_code": 2, "reason": "Could not write checkpoint (No space left on device)."})
    assert ended.wait(30)
    watch.stop()
    assert exits == [("error: rank 0 (host h0) stopped: Could not write checkpoint (No space left on device).", 2)]
    assert store.values["read/1"] == 1  # the failed rank (the store's host) waits for this before it exits


def free_port():
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def start_two_nodes(tmp_path, node0_disk=None, node_args=((), ()), node1_script="train.py", env=None):
    """Two launchers of one job on this host; node 0 gets a tmpfs of `node0_disk` over the output folder,
    node N adds `node_args[N]` to train.py's command line, node 1 may run another script; `env` adds
    environment variables to both."""
    output_dir, port = tmp_path / "out", free_port()
    output_dir.mkdir(exist_ok=True)
    jobs = []
    for rank in (0, 1):
        command = [
            sys.executable,
            "-m",
            "paddle.distributed.launch",
            "--master",
            f"127.0.0.1:{port}",
            "--nnodes",
            "2",
            "--rank",
            str(rank),
            "--nproc_per_node",
            "1",
            "--log_dir",
            str(tmp_path / f"logs{rank}"),
            "train.py" if rank == 0 else node1_script,
            *QUICK_RUN,
            "-o",
            f"train.output_dir={output_dir}",
            *node_args[rank],
        ]
        if rank == 0 and node0_disk:
            mount = f"mount -t tmpfs -o size={node0_disk} tmpfs {output_dir}"
            command = ["unshare", "-m", "sh", "-c", f"{mount} && exec {subprocess.list2cmdline(command)}"]
        console = open(tmp_path / f"console{rank}", "w")
        jobs.append(
            subprocess.Popen(
                command, cwd=ROOT, stdout=console, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
            )
        )
    return jobs


def wait_for_step(log_file, step, jobs, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log_file.exists() and f"step {step}/" in log_file.read_text():
            return
        assert all(job.poll() is None for job in jobs), "a node ended before the step"
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


def wait_for_both(jobs, since):
    """Each node's exit code and seconds from `since` to its end; a hang fails after HANG_GUARD s."""
    ends = [None, None]
    while None in ends:
        for rank, job in enumerate(jobs):
            if ends[rank] is None and job.poll() is not None:
                ends[rank] = time.monotonic() - since
        if time.monotonic() - since > HANG_GUARD:
            for job in jobs:
                job.kill()
            raise AssertionError(f"a node still runs {HANG_GUARD:.0f} s after the failure")
        time.sleep(0.1)
    return [job.returncode for job in jobs], ends


def consoles(tmp_path):
    return [(tmp_path / f"console{rank}").read_text() for rank in (0, 1)]


def assert_no_raw_failure(text):
    assert not any(raw in text for raw in RAW_FAILURES), text[-3000:]


@pytest.mark.slow
def test_rank_zero_refusing_the_output_folder_stops_node_one_with_its_paragraph(tmp_path):
    (tmp_path / "out" / "checkpoints" / "step_5").mkdir(parents=True)  # another run's results
    jobs = start_two_nodes(tmp_path)
    codes, _ = wait_for_both(jobs, time.monotonic())
    node0, node1 = consoles(tmp_path)
    refusal = f"Output folder '{tmp_path / 'out'}' already holds results of another run (checkpoints/step_5)"
    assert codes == [USER_ERROR_EXIT_CODE, USER_ERROR_EXIT_CODE]
    assert f"error: {refusal}" in node0
    assert f"error: rank 0 (host {socket.gethostname()}) stopped: {refusal}" in node1
    assert_no_raw_failure(node0 + node1)


def worker(job):
    return psutil.Process(job.pid).children()[0]


@pytest.mark.slow
@pytest.mark.parametrize("killed", [0, 1])
def test_a_killed_rank_ends_both_nodes_with_a_paragraph(tmp_path, killed):
    jobs = start_two_nodes(tmp_path)
    train_log = tmp_path / "out" / "train.log"
    wait_for_step(train_log, 6, jobs)
    worker(jobs[killed]).kill()
    killed_at = time.monotonic()
    codes, ends = wait_for_both(jobs, killed_at)
    print(f"rank {killed} SIGKILLed: nodes ended after {ends[0]:.1f} s and {ends[1]:.1f} s, codes {codes}")
    survivor = 1 - killed
    paragraph = f"error: rank {survivor} lost its connection to rank {killed} inside a collective operation"
    texts = consoles(tmp_path)
    assert paragraph in texts[survivor] and "train.resume=auto" in texts[survivor]
    assert paragraph in train_log.read_text()  # written by the surviving rank when rank 0 is the one lost
    assert codes[killed] != 0 and codes[survivor] != 0
    assert_no_raw_failure(texts[survivor])


@pytest.mark.slow
def test_a_full_disk_on_node_zero_ends_node_one_with_rank_zero_s_paragraph(tmp_path):
    jobs = start_two_nodes(tmp_path, node0_disk="1m")  # full at the first checkpoint (step 5)
    codes, ends = wait_for_both(jobs, time.monotonic())
    node0, node1 = consoles(tmp_path)
    failure = "Could not write checkpoint"
    assert codes == [USER_ERROR_EXIT_CODE, USER_ERROR_EXIT_CODE]
    assert f"error: {failure}" in node0 and "No space left on device" in node0
    assert f"error: rank 0 (host {socket.gethostname()}) stopped: {failure}" in node1
    assert not (tmp_path / "out" / "checkpoints").exists()  # node 0 wrote into its own disk only
    assert_no_raw_failure(node0 + node1)


def own_paragraph(console):
    """The `error: ...` line a node printed about its own failure (the launcher repeats a failed
    worker's last lines)."""
    lines = {line for line in console.splitlines() if line.startswith("error: ") and " stopped: " not in line}
    assert len(lines) == 1, console[-3000:]
    return lines.pop().removeprefix("error: ")


@pytest.mark.slow
@pytest.mark.parametrize(
    "failing, args",
    [
        (1, ["--config", "configs/missing.yaml"]),  # the config file exists on one machine only
        (1, ["-o", "train.micro_batch_sise=4"]),  # a bad -o on one node's command line
        (0, ["-o", "model.embed_dim=null"]),  # the model check fails on one node
    ],
    ids=["config_missing_on_node_1", "bad_override_on_node_1", "model_check_fails_on_node_0"],
)
def test_a_settings_error_before_the_collective_set_up_ends_both_nodes_with_its_paragraph(tmp_path, failing, args):
    node_args = [(), ()]
    node_args[failing] = args
    jobs = start_two_nodes(tmp_path, node_args=node_args)
    codes, ends = wait_for_both(jobs, time.monotonic())
    print(f"node {failing} refused its settings: nodes ended after {ends[0]:.1f} s and {ends[1]:.1f} s")
    texts = consoles(tmp_path)
    reason = own_paragraph(texts[failing])
    assert codes == [USER_ERROR_EXIT_CODE, USER_ERROR_EXIT_CODE]
    assert f"error: rank {failing} (host {socket.gethostname()}) stopped: {reason}" in texts[1 - failing]
    assert not (tmp_path / "out" / "train.log").exists()  # nobody claimed the folder: nothing written
    assert_no_raw_failure(texts[0] + texts[1])


@pytest.mark.slow
def test_a_rank_that_ends_before_joining_the_job_ends_the_others_within_the_joining_bound(tmp_path):
    """Node 1's worker dies before the collective set-up (as a process killed during its imports would):
    rank 0 would otherwise wait in the set-up for Paddle's own timeout."""
    early_exit = tmp_path / "early_exit.py"
    early_exit.write_text("import os\nos.kill(os.getpid(), 9)\n")
    joining = 12  # the documented way to change the bound, which also keeps this test short
    jobs = start_two_nodes(tmp_path, node1_script=str(early_exit), env={job_watch.JOINING_ENV: str(joining)})
    codes, ends = wait_for_both(jobs, time.monotonic())
    print(f"node 1 died before joining: nodes ended after {ends[0]:.1f} s and {ends[1]:.1f} s, codes {codes}")
    node0, _ = consoles(tmp_path)
    assert codes[0] == 256 - signal.SIGKILL  # the launcher's code for its worker, killed by the deadline
    assert f"error: rank 0 waited {joining} s in the job's collective set-up" in node0
    assert ends[0] < joining + 60  # the bound, not Paddle's own set-up timeout
    assert_no_raw_failure(node0)


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_joining_bound_that_is_not_a_positive_number_is_refused(monkeypatch, value):
    monkeypatch.setenv(job_watch.JOINING_ENV, value)
    with pytest.raises(UserError, match=job_watch.JOINING_ENV):
        job_watch.joining_seconds()


def test_the_joining_bound_defaults_to_90_seconds_and_follows_the_environment(monkeypatch):
    monkeypatch.delenv(job_watch.JOINING_ENV, raising=False)
    assert job_watch.joining_seconds() == 90
    monkeypatch.setenv(job_watch.JOINING_ENV, "600")
    assert job_watch.joining_seconds() == 600
