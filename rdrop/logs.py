"""What a run tells its user: console and `train.log` lines, and VisualDL scalars (rank 0 only).

Other ranks print warnings and errors only, prefixed with their rank, so a multi-GPU console reads
like a single-GPU one.
"""

import logging
import os
import sys

logger = logging.getLogger(__name__)

LOG_FILE = "train.log"
VISUALDL_DIR = "vdl"


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
            to_file = logging.FileHandler(os.path.join(output_dir, LOG_FILE), encoding="utf-8")
            to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            root.addHandler(to_file)
    else:
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter(f"[rank {rank}] %(levelname)s %(message)s"))
        root.addHandler(console)


class MetricsWriter:
    """VisualDL scalars under `output_dir/vdl`, written by rank 0; a no-op on the other ranks."""

    def __init__(self, context, output_dir):
        self._writer = None
        if context.is_main:
            from visualdl import LogWriter

            self._writer = LogWriter(logdir=os.path.join(output_dir, VISUALDL_DIR))

    def scalars(self, prefix, values, step):
        if self._writer is not None:
            for name, value in values.items():
                self._writer.add_scalar(tag=f"{prefix}/{name}", value=float(value), step=step)

    def hparams(self, hparams, metric_tags):
        if self._writer is not None:
            self._writer.add_hparams(hparams_dict=hparams, metrics_list=metric_tags)

    def close(self):
        if self._writer is not None:
            self._writer.close()


def format_duration(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def progress_line(step, total_steps, values, img_per_s, eta_seconds):
    """One console line; `kl` is shown only when present (a run without R-Drop has none)."""
    kl = f"  kl {values['kl']:.4f}" if "kl" in values else ""
    return (
        f"step {step}/{total_steps}  loss {values['loss']:.4f}  ce {values['ce']:.4f}{kl}  "
        f"lr {values['lr']:.3e}  grad_norm {values['grad_norm']:.3f}  {img_per_s:.1f} img/s  "
        f"eta {format_duration(eta_seconds)}"
    )
