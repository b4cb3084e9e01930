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


def forget_log_file():
    """Stop writing an earlier run's train.log: a run started again in the same process (a notebook,
    the tests) must not log its start-up into the previous run's folder before it owns the folder."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


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
    resumed session logs those steps again; a session starting at step 0 (a new run, also one that
    train.overwrite lets replace another) keeps nothing of the earlier records.

    The earlier files are the only copy of the history, so they are deleted only after the new file
    is written, flushed to disk, read back and found to hold every record copied into it (a full
    disk ends the run with a paragraph and leaves them as they were). Each record carries a checksum
    (see `_checked`), so a damaged earlier file gives back exactly the records that are intact, and
    one log line says which bytes were dropped. Every write is flushed, so a killed session loses
    nothing up to its checkpoint. The hyper-parameters go in at the start, so a running or stopped
    run shows them; their table fills with `metric_tags` as they are logged.
    """

    def __init__(self, context, output_dir, start_step, hparams, metric_tags):
        self._file = None
        if not context.is_main:
            return
        from visualdl.component.base_component import hparam, meta_data
        from visualdl.utils.md5_util import md5

        folder = os.path.join(output_dir, VISUALDL_DIR)
        atomic.refuse_link(folder)
        os.makedirs(folder, exist_ok=True)
        earlier_files = sorted(glob.glob(os.path.join(folder, VISUALDL_FILES)))
        path = os.path.join(folder, _next_file_name(earlier_files))
        history = [meta_data(walltime=_now()), hparam(md5(path), _table_values(hparams), list(metric_tags), _now())]
        history += _scalars_up_to(earlier_files, start_step)
        self._file = _write_verified(path, [record.SerializeToString() for record in history], earlier_files)
        for earlier in earlier_files:
            os.remove(earlier)

    def scalars(self, prefix, values, step):
        if self._file is None:
            return
        from visualdl.component.base_component import scalar

        walltime = _now()
        records = [scalar(f"{prefix}/{name}", float(value), step, walltime) for name, value in values.items()]
        try:
            self._file.write(b"".join(_checked(record.SerializeToString()) for record in records))
            self._file.flush()
        except OSError as error:
            logger.warning(
                "Cannot write the VisualDL records (%s): training goes on without them from step %d. A "
                "resume keeps every record written before.",
                error.strerror or error,
                step,
            )
            self.close()

    def close(self):
        if self._file is not None:
            with contextlib.suppress(OSError):  # what could not be written was reported by `scalars`
                self._file.close()
            self._file = None


def _now():
    """Wall time as VisualDL records it: milliseconds."""
    return round(time.time() * 1000)


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
    while f"vdlrecords.{stamp}{CHECKED_SUFFIX}" <= newest:
        stamp += 1
    return f"vdlrecords.{stamp}{CHECKED_SUFFIX}"


# A VisualDL records file is a sequence of records: the length of a serialized protobuf `Record` as
# 8 little-endian bytes, then the record. VisualDL stores no checksum, so a flipped byte would be
# read as another value. This project appends one to each record as a protobuf field that VisualDL's
# `Record` does not define (number 2047, 4 bytes): protobuf readers skip such fields, so VisualDL
# reads the file as usual. The checksum is the CRC-32 of the length and the record before it.
# Files written before records carried checksums end in `.log` only and are read unchecked.
CHECKED_SUFFIX = ".checked.log"
_HEADER = struct.Struct("<Q")
_CHECKSUM_FIELD = bytes([0xFD, 0x7F])  # field 2047, wire type 5 (fixed 32 bits), as a protobuf varint
_CHECKSUM_BYTES = len(_CHECKSUM_FIELD) + 4


def _checked(payload):
    """One record as written to the file: length, `payload` and its checksum."""
    header = _HEADER.pack(len(payload) + _CHECKSUM_BYTES)
    return header + payload + _CHECKSUM_FIELD + zlib.crc32(header + payload).to_bytes(4, "little")


def _record_at(data, offset, checked):
    """(the Record that starts at `offset` of `data`, the offset after it), or None when no whole,
    intact record starts there."""
    from google.protobuf.message import DecodeError
    from visualdl.proto import record_pb2

    if offset + _HEADER.size > len(data):
        return None
    (length,) = _HEADER.unpack_from(data, offset)
    end = offset + _HEADER.size + length
    if end > len(data):
        return None
    if checked:
        if length < _CHECKSUM_BYTES or data[end - _CHECKSUM_BYTES : end - 4] != _CHECKSUM_FIELD:
            return None
        if zlib.crc32(data[offset : end - _CHECKSUM_BYTES]) != int.from_bytes(data[end - 4 : end], "little"):
            return None
    record = record_pb2.Record()
    try:
        record.ParseFromString(data[offset + _HEADER.size : end])
    except DecodeError:
        return None
    return record, end


def _read_records(data, checked):
    """(the intact Records in `data`, the (start, end) byte ranges dropped as damaged).

    With checksums, a damaged stretch is skipped up to the next offset where an intact record starts
    (a record's checksum fails by chance once in 2^32), so damage costs only the records it hits.
    Without them nothing after the first record that cannot be parsed can be trusted.
    """
    records, dropped, offset, damaged_from = [], [], 0, None
    while offset < len(data):
        found = _record_at(data, offset, checked)
        if found is None:
            if damaged_from is None:
                damaged_from = offset
            if not checked:
                break
            offset += 1
            continue
        if damaged_from is not None:
            dropped.append((damaged_from, offset))
            damaged_from = None
        record, offset = found
        records.append(record)
    if damaged_from is not None:
        dropped.append((damaged_from, len(data)))
    return records, dropped


def _scalars_up_to(files, last_step):
    """The Records of the intact scalars in `files` at steps <= last_step, one per tag and step,
    later files winning, in step order. A damaged or torn stretch of a file (a kill mid-write)
    costs only the records in it, and is logged."""
    from visualdl.component.base_component import scalar

    kept = {}
    for path in files:
        with open(path, "rb") as stream:
            data = stream.read()
        records, dropped = _read_records(data, checked=path.endswith(CHECKED_SUFFIX))
        if dropped:
            logger.warning(
                "VisualDL records %s: bytes %s of %d are damaged or cut short, and the records in them are "
                "dropped; the %d intact records are kept",
                path,
                ", ".join(f"{start}-{end}" for start, end in dropped),
                len(data),
                len(records),
            )
        for record in records:
            for value in record.values:
                if value.WhichOneof("one_value") == "value" and value.id <= last_step:
                    kept[(value.tag, value.id)] = (value.value, value.timestamp)
    return [
        scalar(tag, value, step, walltime)
        for (tag, step), (value, walltime) in sorted(kept.items(), key=lambda item: (item[0][1], item[0][0]))
    ]


def _write_verified(path, payloads, earlier_files):
    """The open file `path` for appending, after `payloads` were written to it, flushed to disk and
    read back intact; until then the file has a hidden name that VisualDL does not read."""
    folder = os.path.dirname(path)
    partial = os.path.join(folder, PARTIAL_RECORDS)
    atomic.remove(partial)  # left over by a session killed while copying
    stream = None
    try:
        stream = atomic.open_own(partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, "r+b")
        written = b"".join(_checked(payload) for payload in payloads)
        stream.write(written)
        stream.flush()
        os.fsync(stream.fileno())
        stream.seek(0)
        if stream.read() != written:
            raise OSError(errno.EIO, "the file read back differs from what was written", partial)
        os.rename(partial, path)
        atomic.fsync_path(folder)
    except OSError as error:
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
        with contextlib.suppress(OSError):
            atomic.remove(partial)
        kept = ", ".join(os.path.basename(earlier) for earlier in earlier_files) or "none"
        raise UserError(
            f"Could not write the run's VisualDL records to '{folder}' ({error.strerror or error}). The "
            f"earlier records there ({kept}) are kept unchanged. Free disk space or make the folder "
            f"writable, then resume with -o train.resume=auto."
        ) from None
    return stream


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
