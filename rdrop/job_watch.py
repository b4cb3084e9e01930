"""A failure on any rank ends every rank of the job, on every machine, within a bound, with its reason.

Paddle's launcher watches only the processes of its own machine, and its default (HTTP) master does
not pass one machine's failure on to the others (only the etcd master implements that). Without this
module a rank that stops (a UserError, a crash, a killed process) leaves the other machines waiting
in their next collective: over gloo until its timeout, in a traceback that names no cause; over NCCL
until the scheduler kills the job. This is the run's one watch over its ranks:

- `join(configure)` reads the run's settings on every rank and joins the job even when that failed
  (a config file missing on one machine, a bad -o, an unknown model name): the ranks then exchange
  their outcome, so every rank ends with the failed rank's paragraph instead of waiting for it in
  the collective set-up. `all_or_none(context)` does the same around a later start-up step (the
  output-folder claim, the dataset), before any collective that could hang.
- `start(context, log_file)`, right after `join`, starts `JobWatch`: a daemon thread in every rank
  that talks to the key-value store the collective set-up already created (Paddle's TCPStore, served
  by rank 0's process at PADDLE_MASTER) over a connection of its own. Every HEARTBEAT_SECONDS each
  rank increments its heartbeat counter and reads the job's event counter; rank 0 also reads every
  other rank's heartbeat. A rank that ends in failure posts its reason as an event
  (`announce_failures`, around train.py's main) and waits a moment for the others to read it. A
  rank whose heartbeat has not moved for SILENCE_SECONDS is posted as lost by rank 0. When the store
  stops answering (rank 0's process or machine is gone, or frozen) the others notice at once
  (connection refused) or after SILENCE_SECONDS (no answer). Each rank that learns of a failure
  says which rank stopped and why (its console; rank 0 also train.log) and ends its own process:
  with the failed rank's exit code (2 for a UserError, 75 for a stop signal during start-up, 1 for a
  crash), or PEER_LOST_EXIT_CODE for a rank that vanished.
- Small helper processes (they import nothing heavy) speak when this process no longer can:
  rdrop/joining_deadline.py ends a rank that waits more than JOINING_SECONDS in the collective set-up
  (Paddle waits there in C++, holding the Python lock); rdrop/output_relay.py passes the worker's
  output on and turns gloo's C++ abort into a paragraph; rdrop/rank_watcher.py sees at once when
  another worker on this machine dies or is frozen and names it on the launcher's console, which
  shows only rank 0's log.

The bound: a reason reaches every rank within HEARTBEAT_SECONDS; a vanished rank is noticed within
SILENCE_SECONDS + HEARTBEAT_SECONDS (32 s); a rank that never joins, within JOINING_SECONDS (90 s,
or JOINING_ENV's value).
Once the job has joined, Paddle releases the GIL while it computes and while it waits in a
collective (a 0.25 s heartbeat thread never missed a beat during matmuls and 8 s waits in
all_reduce, barrier and DataParallel's broadcast here), so the thread beats whatever the training
loop is doing; the C++ kernel compile runs in a child process.
"""

import contextlib
import functools
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time

from rdrop import distributed
from rdrop.errors import PEER_LOST_EXIT_CODE, UserError
from rdrop.preemption import STOPPED_EXIT_CODE, Stopped

import psutil

logger = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 2.0
SILENCE_SECONDS = 30.0
# The collective set-up waits for every rank; the launchers start their workers together, so only a
# rank that ended before joining (or a machine that cannot reach PADDLE_MASTER) keeps it waiting longer.
# Where machines start far apart (a scheduler that pulls images node by node), JOINING_ENV raises it.
JOINING_SECONDS = 90.0
JOINING_ENV = "RDROP_JOINING_SECONDS"
CRASH_EXIT_CODE = 1
# When rank 0's store vanishes, the local worker watch may be naming rank 0's death on the launcher's
# console at that moment: it gets this long before it is stopped.
LOCAL_REPORT_SECONDS = 2.0
_KEY = "rdrop/job_watch/"
_STORE_ERRORS = (ValueError, RuntimeError, OSError)  # how Paddle's TCPStore reports a lost connection


class JobStop(UserError):
    """A failure every rank already knows about (agreed in `all_or_none`): not announced again."""

    def __init__(self, paragraph, exit_code):
        super().__init__(paragraph)
        self.exit_code = exit_code


def _paragraph(error):
    return " ".join(str(error).split())


def _agree(failure, context):
    """Every rank's start-up outcome (None, or (paragraph, exit code)) exchanged; a JobStop when any
    rank failed (the failing rank with its own paragraph, the others with "rank N (host H) stopped:
    ..."), after which no rank announces anything more: every rank already knows."""
    reports = distributed.gather((failure, socket.gethostname()), context)
    failed = [(rank, host, report) for rank, (report, host) in enumerate(reports) if report is not None]
    if not failed:
        return
    if _running is not None:
        _running.stop()  # the ranks now end together: none of them is lost
    if failure is not None:
        raise JobStop(*failure)
    rank, host, (paragraph, exit_code) = failed[0]
    raise JobStop(f"rank {rank} (host {host}) stopped: {paragraph}", exit_code)


def _outcome(error):
    """(paragraph, exit code) another rank is told about an exception that ends this one."""
    if isinstance(error, UserError):
        return _paragraph(error), error.exit_code
    if isinstance(error, SystemExit):  # argparse refusing the command line; it printed why
        return "its command line was refused (the usage message on its console says why)", error.code
    return f"crashed with {type(error).__name__}: {_paragraph(error)} (its traceback is in its log)", CRASH_EXIT_CODE


def join(configure):
    """`configure()` (reading the command line and config, the checks that need no other rank), then
    the job's collective set-up (`distributed.init`) on every rank, also on a rank whose `configure`
    failed: a rank that left before the set-up would keep the others in it until its timeout.
    Returns (what `configure` returned, the Context), or ends every rank with the failed rank's
    reason; the failed rank ends with its own exception (a crash keeps its traceback)."""
    failed, result = None, None
    try:
        result = configure()
    except (SystemExit, Exception) as error:
        if isinstance(error, SystemExit) and error.code in (0, None):
            raise  # --help
        failed = error
    deadline = _start_joining_deadline()
    context = distributed.init()
    if deadline is not None:
        deadline.stdin.close()
        deadline.wait()
    if context.world_size > 1:
        try:
            _agree(None if failed is None else _outcome(failed), context)
        except JobStop:
            if failed is None:
                raise
    if failed is not None:
        raise failed
    return result, context


def joining_seconds():
    """How long a rank waits in the collective set-up: JOINING_SECONDS, or the environment's JOINING_ENV."""
    value = os.environ.get(JOINING_ENV)
    if value is None:
        return JOINING_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise UserError(
            f"{JOINING_ENV}={value!r} is not a number of seconds above 0. It is how long a rank waits for "
            f"the others to join the job (default {JOINING_SECONDS:.0f}); set it to a positive number, "
            f"or unset it."
        )
    return seconds


def _start_joining_deadline():
    """rdrop/joining_deadline.py over this worker's collective set-up, under Paddle's launcher."""
    if distributed.dist.get_world_size() == 1:
        return None
    seconds = joining_seconds()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "joining_deadline.py")
    return subprocess.Popen(
        [
            sys.executable,
            script,
            str(seconds),
            str(os.getpid()),
            os.environ.get("PADDLE_TRAINER_ID", "?"),
            os.environ.get("PADDLE_MASTER", "?"),
        ],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )


@contextlib.contextmanager
def all_or_none(context):
    """Run the block on every rank; a UserError on any rank then ends every rank with that paragraph
    (the failing rank with its own, the others with "rank N (host H) stopped: ..."), before anything
    after the block can wait for the failed rank. The block must run no collective."""
    failure = None
    try:
        yield
    except UserError as error:
        failure = (_paragraph(error), error.exit_code)
    _agree(failure, context)


def _report(message):
    """On this rank's console, and in train.log when this rank writes it (rank 0, after logs.setup)."""
    if logging.getLogger().handlers:
        logger.error(message)
    else:
        print(message, file=sys.stderr, flush=True)


class _Store:
    """The job's events and heartbeats in Paddle's TCPStore. Only `add` of 0 is used to read a counter
    (`get` of a missing key waits for it); an event is written before the counter that announces it."""

    def __init__(self, endpoint, world_size):
        from paddle.base import core

        host, port = endpoint.rsplit(":", 1)
        self._store = core.TCPStore(host, int(port), False, world_size, int(SILENCE_SECONDS))

    def counter(self, name, increment=0):
        return self._store.add(_KEY + name, increment)

    def post(self, event):
        """Publish `event` (a dict); returns its number."""
        number = self.counter("reserved", 1)
        self._store.set(f"{_KEY}event/{number}", json.dumps(event).encode())
        self.counter("events", 1)
        return number

    def events(self, first, last):
        return [json.loads(bytes(self._store.get(f"{_KEY}event/{n}"))) for n in range(first, last + 1)]


def _start_rank_watcher(context, log_file):
    """rdrop/rank_watcher.py over the other workers of this machine (the launcher's other children),
    or None when there are none."""
    siblings = []
    for process in psutil.Process(os.getppid()).children():
        try:
            rank = process.environ().get("PADDLE_TRAINER_ID")
        except psutil.Error:
            continue
        if process.pid != os.getpid() and rank is not None:
            siblings.append(f"{rank}:{process.pid}")
    if not siblings:
        return None
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rank_watcher.py")
    return subprocess.Popen(
        [sys.executable, script, str(context.rank), str(os.getpid()), str(os.getppid()), log_file, *siblings],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )


class JobWatch:
    """The watch of one rank; `stop()` before the ranks part at the end (a rank that is done may then
    leave first)."""

    def __init__(self, context, endpoint, log_file):
        self.context = context
        self._rank_watcher = _start_rank_watcher(context, log_file)
        self.hosts = distributed.gather(socket.gethostname(), context)
        self._store = _Store(endpoint, context.world_size)
        self._lock = threading.Lock()  # one request at a time on the connection
        self._stopped = threading.Event()
        self._last_answer = time.monotonic()
        self._events_seen = 0
        # Rank 0 watches the others' heartbeats; they watch rank 0 through the store's answers.
        others = range(1, context.world_size) if context.is_main else ()
        self._peers = {rank: (-1, time.monotonic()) for rank in others}
        self._lost = set()
        self._beat()
        for target in (self._watch, self._deadline):
            threading.Thread(target=target, name=f"job-watch-{target.__name__}", daemon=True).start()

    def _end_watching(self, grace=0.0):
        """From now on this rank ends on purpose: nothing it sees afterwards is a failure to report.
        With `grace`, the local worker watch first gets that many seconds to name a worker of this
        machine that died: it reports on the launcher's console, where this rank's own lines may not
        show, and then ends by itself."""
        self._stopped.set()
        if self._rank_watcher is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._rank_watcher.wait(timeout=grace)
            self._rank_watcher.kill()
            self._rank_watcher.wait()

    def stop(self):
        if self._stopped.is_set():
            return
        self._end_watching()
        with self._lock, contextlib.suppress(*_STORE_ERRORS):
            self._store.counter(f"done/{self.context.rank}", 1)

    def announce(self, exit_code, paragraph):
        """Tell every other rank that this one ends (`paragraph`, `exit_code`), and give them up to two
        heartbeats to read it: when rank 0 ends, the store ends with it."""
        if self._stopped.is_set():
            return
        self._end_watching()
        with contextlib.suppress(*_STORE_ERRORS):  # the store's host is gone too: nobody to tell
            with self._lock:
                number = self._store.post({"rank": self.context.rank, "exit_code": exit_code, "reason": paragraph})
            self._wait_for_readers(number, self.context.world_size - 1)

    def _wait_for_readers(self, number, readers):
        """Until `readers` ranks have read event `number`, or two heartbeats (one may be dead)."""
        deadline = time.monotonic() + 2 * HEARTBEAT_SECONDS + 1
        while time.monotonic() < deadline:
            with self._lock:
                read = self._store.counter(f"read/{number}")
            self._last_answer = time.monotonic()
            if read >= readers:
                return
            time.sleep(0.1)

    def _beat(self):
        with self._lock:
            self._store.counter(f"beat/{self.context.rank}", 1)
            events = self._store.counter("events")
            news = self._store.events(self._events_seen + 1, events) if events > self._events_seen else []
            for number in range(self._events_seen + 1, events + 1):
                self._store.counter(f"read/{number}", 1)
            self._events_seen = events
            beats = {rank: self._store.counter(f"beat/{rank}") for rank in self._peers}
        self._last_answer = time.monotonic()
        for event in news:
            self._end(event)
        for rank, count in beats.items():
            self._check_heartbeat(rank, count)

    def _check_heartbeat(self, rank, count):
        previous, since = self._peers[rank]
        now = time.monotonic()
        if count != previous:
            self._peers[rank] = (count, now)
        elif now - since >= SILENCE_SECONDS and rank not in self._lost:
            with self._lock:
                done = self._store.counter(f"done/{rank}")
            if done:
                del self._peers[rank]
                return
            self._lost.add(rank)
            event = {
                "rank": rank,
                "exit_code": PEER_LOST_EXIT_CODE,
                "reason": f"rank {rank} has not been heard from for {SILENCE_SECONDS:.0f} s: its process or its "
                f"machine is gone (killed, crashed, out of memory, cut off from the network) or frozen",
                "lost": True,
            }
            with self._lock:
                number = self._store.post(event)
            self._wait_for_readers(number, self.context.world_size - 2)  # this store ends with rank 0
            self._end(event)

    def _end(self, event):
        """Say which rank stopped and why, and end this process with the matching exit code."""
        if self._stopped.is_set():
            return
        rank = event["rank"]
        if event.get("lost"):
            message = (
                f"error: {event['reason']} (rank {rank}, host {self.hosts[rank]}). The job cannot continue; "
                f"rank {self.context.rank} stops too (exit code {event['exit_code']}). Look at rank {rank}'s "
                f"log for why it ended, then restart the job with -o train.resume=auto to continue from the "
                f"last checkpoint."
            )
        else:
            message = f"error: rank {rank} (host {self.hosts[rank]}) stopped: {event['reason']}"
        self._exit(message, event["exit_code"])

    def _exit(self, message, exit_code, grace=0.0):
        self._end_watching(grace)
        _report(message)
        sys.stdout.flush()
        os._exit(exit_code)

    def _watch(self):
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            try:
                self._beat()
            except _STORE_ERRORS:
                self._lost_store("stopped answering (its connection closed)")

    def _deadline(self):
        """The store's host may also vanish without closing the connection (a machine that is switched
        off, a frozen process): then a request never returns, and this thread notices."""
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            silence = time.monotonic() - self._last_answer
            if silence >= SILENCE_SECONDS + HEARTBEAT_SECONDS:
                self._lost_store(f"has not answered for {silence:.0f} s")

    def _lost_store(self, what):
        if self._stopped.is_set():
            return
        self._exit(
            f"error: rank 0 (host {self.hosts[0]}), which holds the job's rendezvous store, {what}: rank 0's "
            f"process or its machine is gone (killed, crashed, out of memory, cut off from the network) or "
            f"frozen. The job cannot continue; rank {self.context.rank} stops too (exit code "
            f"{PEER_LOST_EXIT_CODE}). Look at rank 0's log (the console of the launcher with --rank 0) for "
            f"why it ended, then restart the job with -o train.resume=auto to continue from the last "
            f"checkpoint.",
            PEER_LOST_EXIT_CODE,
            grace=LOCAL_REPORT_SECONDS,
        )


_running = None


def start(context, log_file):
    """Start this rank's watch when the job has several ranks under Paddle's launcher; returns it (or
    None). Call it right after `distributed.init`; `log_file` is the run's train.log."""
    global _running
    endpoint = os.environ.get("PADDLE_MASTER")
    if context.world_size > 1 and endpoint:
        _relay_stderr(context, log_file)
        _running = JobWatch(context, endpoint, log_file)
    return _running


def _relay_stderr(context, log_file):
    """From now on this process's output goes through rdrop/output_relay.py (see there why). Under the
    launcher stdout and stderr go to the same worker log; Paddle prints its FatalError dump on stdout."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "output_relay.py")
    sys.stdout.flush()
    sys.stderr.flush()
    relay = subprocess.Popen(
        [sys.executable, script, str(context.rank), str(context.world_size), log_file],
        stdin=subprocess.PIPE,
        stdout=os.dup(1),
        start_new_session=True,
    )
    for stream in (1, 2):
        os.dup2(relay.stdin.fileno(), stream)
    relay.stdin.close()


def stop():
    """The end of the job's collective part: from here on a rank that is done may leave first."""
    if _running is not None:
        _running.stop()


def announce_failures(main):
    """Entry-point wrapper: when `main` ends in an exception while the watch runs, the other ranks
    learn which rank stopped and why (its paragraph, or the crash's type and message)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            _to_log_file(_paragraph(error))
            if not isinstance(error, JobStop):
                _announce(error.exit_code, _paragraph(error))
            raise
        except Stopped as stopped:
            _announce(STOPPED_EXIT_CODE, f"stopped by {stopped} during start-up, before the first training step")
            raise
        except Exception as error:
            _announce(
                CRASH_EXIT_CODE,
                f"crashed with {type(error).__name__}: {_paragraph(error)} (its traceback is in its log)",
            )
            raise

    return wrapper


def _to_log_file(paragraph):
    """train.log, when this rank writes it, gets the paragraph the entry point prints on the console."""
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, f"error: {paragraph}", None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _announce(exit_code, paragraph):
    if _running is not None:
        _running.announce(exit_code, paragraph)
