"""What a run tells its user: console and `train.log` lines, progress of long loops, and VisualDL
records (rank 0 only).

Other ranks print warnings and errors only, prefixed with their rank, so a multi-GPU console reads
like a single-GPU one.
"""

import contextlib
import errno
import glob
import logging
import os
import struct
import sys
import time
import zlib

from rdrop import atomic
from rdrop.errors import UserError

import paddle

logger = logging.getLogger(__name__)

LOG_FILE = "train.log"
VISUALDL_DIR = "vdl"
VISUALDL_FILES = "vdlrecords.*.log"
PARTIAL_RECORDS = ".records.partial"  # a name VisualDL does not read: it lacks `vdlrecords`


def setup(context, output_dir=None):
    """Route all `logging` output: rank 0 to stdout (and output_dir/train.log), others warnings only."""
    _route(context.rank, output_dir)


def setup_single_process():
    """Route all `logging` output of a tool that always runs as one process (a script) to stdout."""
    _route(0, None)


def _route(rank, output_dir):
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    if rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        root.addHandler(console)
        if output_dir is not None:
            to_file = _LogFileHandler(os.path.join(output_dir, LOG_FILE))
            to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(to_file)
    else:
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        root.addHandler(console)


class _LogFileHandler(logging.FileHandler):
    """Appends to train.log, opened without following a link planted at its name (rdrop/atomic.py)."""

    def _open(self):
        return atomic.open_own(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "a")


class MetricsWriter:
    """VisualDL records of one run in `output_dir/vdl`, written by rank 0; a no-op on the other ranks.

    VisualDL shows one run per folder and reads only the newest `vdlrecords.*.log` in it, so a run
    keeps exactly one file however often it is resumed: a session starting at `start_step` copies
    the scalars that earlier sessions logged up to that step into its own new file and deletes the
    older files. What a killed session logged after its last checkpoint is dropped, because the
    resumed session logs those steps again. Every write is flushed, so a killed session loses nothing
    up to its checkpoint. The hyper-parameters go in at the start, so a running or stopped run shows
    them; their table fills with `metric_tags` as they are logged.
    """

    def __init__(self, context, output_dir, start_step, hparams, metric_tags):
        self._writer = None
        if not context.is_main:
            return
        from visualdl import LogWriter

        folder = os.path.join(output_dir, VISUALDL_DIR)
        earlier_files = sorted(glob.glob(os.path.join(folder, VISUALDL_FILES)))
        kept = _scalars_up_to(earlier_files, start_step)
        self._writer = LogWriter(logdir=folder, file_name=_next_file_name(earlier_files))
        self._writer.add_hparams(hparams_dict=_table_values(hparams), metrics_list=list(metric_tags))
        for tag, records in kept.items():
            for step, (value, walltime) in sorted(records.items()):
                self._writer.add_scalar(tag=tag, value=value, step=step, walltime=walltime)
        self._writer.flush()
        for path in earlier_files:
            os.remove(path)

    def scalars(self, prefix, values, step):
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(tag=f"{prefix}/{name}", value=float(value), step=step)
            self._writer.flush()

    def close(self):
        if self._writer is not None:
            self._writer.close()


def _table_values(hparams):
    """`hparams` as VisualDL's table shows them: it leaves a name with a dot blank (`model.name` is
    shown as `model_name`) and takes scalars only."""
    table = {}
    for name, value in hparams.items():
        scalar = isinstance(value, (int, float, str)) and not isinstance(value, bool)
        table[name.replace(".", "_")] = value if scalar else str(value)
    return table


def _next_file_name(earlier_files):
    """A file name that sorts after every earlier one, VisualDL's notion of newest."""
    newest = max((os.path.basename(path) for path in earlier_files), default="")
    stamp = time.time_ns()
    while f"vdlrecords.{stamp}.log" <= newest:
        stamp += 1
    return f"vdlrecords.{stamp}.log"


def _scalars_up_to(files, last_step):
    """{tag: {step: (value, walltime ms)}} of the scalars in `files` at steps <= last_step, later
    files winning. Records are parsed one by one, so a file cut short by a kill mid-write still gives
    every record before the cut (VisualDL's LogReader rejects the whole file)."""
    from visualdl.proto import record_pb2
    from visualdl.reader.record_reader import RecordReader

    kept = {}
    for path in files:
        for raw in RecordReader(filepath=path).get_remain():
            record = record_pb2.Record()
            try:
                record.ParseFromString(raw)
            except Exception:  # protobuf's DecodeError: the torn last record
                logger.warning("VisualDL log %s ends in a damaged record; the records before it are kept", path)
                continue
            for value in record.values:
                if value.WhichOneof("one_value") == "value" and value.id <= last_step:
                    kept.setdefault(value.tag, {})[value.id] = (value.value, value.timestamp)
    return kept


class Progress:
    """Progress of a long loop on the console, as training shows it: `label i/total, elapsed, eta`.

    Silent for a loop that finishes within `quiet_seconds`; after that one line every
    `every_seconds` at most, and a last line at the end. Only where `show` is true (rank 0).
    """

    def __init__(self, label, total, show=True, quiet_seconds=5.0, every_seconds=15.0, clock=time.perf_counter):
        self.label, self.total, self.show = label, total, show
        self.every_seconds, self.clock = every_seconds, clock
        self.start = clock()
        self.next_report = self.start + quiet_seconds
        self.reported = False

    def update(self, done):
        """Report that `done` of `total` items are finished (done >= 1)."""
        now = self.clock()
        finished_after_a_report = self.reported and done >= self.total
        if not self.show or (now < self.next_report and not finished_after_a_report):
            return
        elapsed = now - self.start
        logger.info(
            "%s %d/%d, %s elapsed, eta %s",
            self.label,
            done,
            self.total,
            format_duration(elapsed),
            format_duration(elapsed / done * (self.total - done)),
        )
        self.reported = True
        self.next_report = now + self.every_seconds


# What each logged name means. Training: the objective the optimizer minimises (R-Drop:
# CE_a + CE_b + alpha * KL_sym; without R-Drop: CE), the cross-entropy per dropout sample (the mean
# of CE_a and CE_b, so it compares with a run without R-Drop) and the symmetric KL between the two
# samples (R-Drop runs only). Evaluation scalars are logged under the split's name (val/ or test/).
TRAIN_LOSSES = ("objective", "cross_entropy", "symmetric_kl")
EVAL_SCALARS = ("top1", "top5", "cross_entropy")


def train_scalars(losses, two_samples):
    """The step's losses (rdrop.loss names) as logged: no KL for a single-sample run."""
    return {name: losses[name] for name in TRAIN_LOSSES if name != "symmetric_kl" or two_samples}


def eval_scalars(metrics):
    return {name: metrics[name] for name in EVAL_SCALARS}


def eval_tags(split):
    return [f"{split}/{name}" for name in EVAL_SCALARS]


class TrainingProgress:
    """The training log of the steps since the last report: mean losses, the last learning rate and
    gradient norm, throughput and ETA, as a console line and VisualDL scalars. Losses are summed on
    the device, so a step reads nothing back to the host."""

    def __init__(self, cfg, two_samples, writer, clock=time.perf_counter):
        self.total_steps, self.global_batch_size = cfg["schedule"]["total_steps"], cfg["train"]["global_batch_size"]
        self.log_every, self.two_samples, self.writer, self.clock = (
            cfg["train"]["log_every"],
            two_samples,
            writer,
            clock,
        )
        self._reset()

    def _reset(self):
        self.sums = {name: paddle.zeros([], dtype="float32") for name in TRAIN_LOSSES}
        self.start, self.steps = self.clock(), 0

    def add(self, outcome, step):
        """Count the outcome of step `step` (TrainStep's), and report every `train.log_every` steps and at the end."""
        for name in self.sums:
            self.sums[name] += outcome["losses"][name]
        self.steps += 1
        if step % self.log_every and step != self.total_steps:
            return
        values = train_scalars({name: float(total) / self.steps for name, total in self.sums.items()}, self.two_samples)
        values.update(lr=outcome["lr"], grad_norm=float(outcome["grad_norm"]))
        elapsed = self.clock() - self.start
        img_per_s = self.steps * self.global_batch_size / elapsed
        eta = (self.total_steps - step) * elapsed / self.steps
        logger.info(progress_line(step, self.total_steps, values, img_per_s, eta))
        self.writer.scalars("train", dict(values, img_per_s=img_per_s), step)
        self._reset()


def format_duration(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def progress_line(step, total_steps, values, img_per_s, eta_seconds):
    """One console line; `symmetric_kl` is shown only when present (a run without R-Drop has none)."""
    kl = f"  symmetric_kl {values['symmetric_kl']:.4f}" if "symmetric_kl" in values else ""
    return (
        f"step {step}/{total_steps}  objective {values['objective']:.4f}  "
        f"cross_entropy {values['cross_entropy']:.4f}{kl}  lr {values['lr']:.3e}  "
        f"grad_norm {values['grad_norm']:.3f}  {img_per_s:.1f} img/s  eta {format_duration(eta_seconds)}"
    )
