"""Plot the training cross-entropy, R-Drop's KL and the top-1 of several runs on one figure.

    python scripts/plot_curves.py output/vit_b16_cifar100 output/vit_b16_cifar100_rdrop --output curves.png

Reads the VisualDL scalars each run wrote into RUN_DIR/vdl and draws one panel per quantity against
the optimizer step, one curve per run, labelled with the run folder's name:

- `train/cross_entropy`: the training cross-entropy per dropout sample (an R-Drop run's is the mean
  of its two passes), so runs with and without R-Drop compare;
- `train/symmetric_kl`: the symmetric KL between the two dropout passes (R-Drop runs only);
- `val/top1` or `test/top1`: top-1 during training on the split the run selected on, named in the
  legend.

Runs written before these names existed are read too: their `train/ce` was the sum of both passes'
cross-entropies when the run logged `train/kl`, and is halved; their `eval/top1` did not record its
split. Older runs kept one VisualDL file per session; they are merged, the later session's value
winning where both logged the same step. A run without one of the quantities is drawn without that
curve (and a note is logged); a folder without VisualDL logs is an error.
"""

import argparse
import glob
import logging
import os
import pathlib

from rdrop import logs
from rdrop.errors import UserError, exit_missing_dependency, exit_on_user_error

try:
    from matplotlib.figure import Figure
    from visualdl import LogReader
except ImportError as error:
    exit_missing_dependency(error, "scripts/plot_curves.py", "pip install -r requirements.txt")

logger = logging.getLogger("plot_curves")

PANELS = (
    ("cross_entropy", "training cross-entropy per dropout sample\n(train/cross_entropy)"),
    ("symmetric_kl", "symmetric KL between the two dropout passes\n(train/symmetric_kl)"),
    ("top1", "top-1 (%) on the selection split during training\n(val/top1 or test/top1)"),
)
# Where each panel's values are, newest name first: (tag, split shown in the legend, scale).
SOURCES = {
    "cross_entropy": (("train/cross_entropy", None, 1.0), ("train/ce", None, None)),
    "symmetric_kl": (("train/symmetric_kl", None, 1.0), ("train/kl", None, 1.0)),
    "top1": (("val/top1", "val", 1.0), ("test/top1", "test", 1.0), ("eval/top1", "split not recorded", 1.0)),
}
OLD_SUMMED_CE, OLD_KL = "train/ce", "train/kl"
ALL_TAGS = [tag for sources in SOURCES.values() for tag, _, _ in sources]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="training output folders (train.output_dir)")
    parser.add_argument("--output", required=True, help="image file to write (PNG)")
    return parser.parse_args(argv)


def visualdl_files(run_dir):
    files = sorted(glob.glob(os.path.join(run_dir, logs.VISUALDL_DIR, logs.VISUALDL_FILES)), key=_written_at)
    if not files:
        raise UserError(
            f"'{run_dir}' holds no VisualDL logs ({os.path.join(run_dir, logs.VISUALDL_DIR, logs.VISUALDL_FILES)} "
            f"is missing). Pass the train.output_dir of a training run."
        )
    return files


def _written_at(path):
    """The creation time VisualDL puts in the file name (vdlrecords.<unix time>.log), for ordering sessions."""
    stamp = os.path.basename(path).split(".")[1]
    return (int(stamp) if stamp.isdigit() else 0, path)


def read_scalars(files, tags):
    """{tag: (steps, values)} sorted by step, merged over `files` (later files win on equal steps)."""
    merged = {tag: {} for tag in tags}
    for path in files:
        try:
            reader = LogReader(file_path=path)
            present = set(reader.get_tags().get("scalar", []))
            for tag in tags:
                if tag in present:
                    merged[tag].update((record.id, record.value) for record in reader.get_data("scalar", tag))
        except Exception as error:  # VisualDL's protobuf reader raises many types on a damaged file
            raise UserError(
                f"Cannot read the VisualDL log '{path}' ({type(error).__name__}: {error}). The file "
                f"is damaged; move it out of the vdl folder to plot the others."
            ) from None
    return {
        tag: (sorted(points), [points[step] for step in sorted(points)]) for tag, points in merged.items() if points
    }


def panel_curves(scalars):
    """{panel: (steps, values, split or None)} of one run from its {tag: (steps, values)}."""
    curves = {}
    for panel, sources in SOURCES.items():
        for tag, split, scale in sources:
            if tag in scalars:
                steps, values = scalars[tag]
                if scale is None:  # the old summed CE: two passes when the run logged a KL, else one
                    scale = 0.5 if OLD_KL in scalars else 1.0
                curves[panel] = (steps, [value * scale for value in values], split)
                break
    return curves


def run_labels(run_dirs):
    """Each run's folder name, or its last two path parts where folder names repeat."""
    names = [os.path.basename(os.path.normpath(run)) for run in run_dirs]
    return [
        os.path.join(*pathlib.Path(os.path.abspath(run)).parts[-2:]) if names.count(name) > 1 else name
        for run, name in zip(run_dirs, names)
    ]


def plot(runs, output):
    """Draw {label: {panel: (steps, values, split)}} into `output`; returns {panel: legend entries drawn}."""
    figure = Figure(figsize=(6 * len(PANELS), 4.5), layout="constrained")
    axes = figure.subplots(1, len(PANELS))
    drawn = {}
    for axis, (panel, title) in zip(axes, PANELS):
        drawn[panel] = []
        for index, (label, curves) in enumerate(runs.items()):
            if panel not in curves:
                continue
            steps, values, split = curves[panel]
            legend = f"{label} ({split})" if split else label
            axis.plot(steps, values, label=legend, color=f"C{index}", marker="o" if len(steps) < 30 else None)
            drawn[panel].append(legend)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
        if drawn[panel]:
            axis.legend(fontsize=8)
        else:
            axis.text(0.5, 0.5, "no run logged this", ha="center", va="center", transform=axis.transAxes)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        figure.savefig(output, dpi=120)
    except OSError as error:
        raise UserError(
            f"Cannot write the figure to --output '{output}' ({error.strerror or error}). Choose a writable path."
        ) from None
    return drawn


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    logs.setup_single_process()
    runs = {
        label: panel_curves(read_scalars(visualdl_files(run), ALL_TAGS))
        for label, run in zip(run_labels(args.runs), args.runs)
    }
    for label, curves in runs.items():
        for panel, _ in PANELS:
            if panel not in curves:
                tags = " or ".join(tag for tag, _, _ in SOURCES[panel])
                logger.warning("note: run %s logged no %s; its curve is left out", label, tags)
    drawn = plot(runs, args.output)
    logger.info("Wrote %s (%d run(s))", args.output, len(runs))
    return drawn


if __name__ == "__main__":
    main()
