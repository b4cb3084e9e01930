"""scripts/plot_curves.py on VisualDL logs written here: merged sessions, missing tags, the figure."""

import matplotlib.image
import numpy as np
import pytest
from run_helpers import load_script
from visualdl import LogWriter

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


plot_curves = load_script("plot_curves")


def write_session(run_dir, file_name, scalars):
    """One training session's VisualDL file: scalars is {tag: [(step, value), ...]}."""
    with LogWriter(logdir=str(run_dir / "vdl"), file_name=file_name) as writer:
        for tag, points in scalars.items():
            for step, value in points:
                writer.add_scalar(tag=tag, value=value, step=step)


def test_two_runs_are_plotted_and_a_missing_tag_is_noted(tmp_path, capsys):
    write_session(
        tmp_path / "baseline",
        "vdlrecords.100.log",
        {"train/cross_entropy": [(2, 4.0), (4, 3.5), (6, 3.0)], "val/top1": [(3, 10.0), (6, 20.0)]},
    )
    write_session(
        tmp_path / "rdrop",
        "vdlrecords.100.log",
        {"train/cross_entropy": [(2, 4.2), (4, 3.6), (6, 3.1)], "train/symmetric_kl": [(2, 0.5), (4, 0.3), (6, 0.2)]},
    )
    output = tmp_path / "figures" / "curves.png"
    drawn = plot_curves.main([str(tmp_path / "baseline"), str(tmp_path / "rdrop"), "--output", str(output)])
    assert drawn == {"cross_entropy": ["baseline", "rdrop"], "symmetric_kl": ["rdrop"], "top1": ["baseline (val)"]}
    notes = capsys.readouterr().out
    assert "baseline logged no train/symmetric_kl" in notes and "rdrop logged no val/top1" in notes
    assert output.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(str(output))
    assert pixels.shape[0] > 100 and np.ptp(pixels[..., :3]) > 0.5  # something was drawn on it


def test_runs_logged_before_the_renaming_are_read_with_the_cross_entropy_per_pass():
    """Old R-Drop runs logged train/ce = CE_a + CE_b (and train/kl); old plain runs one CE and no KL."""
    old_rdrop = {"train/ce": ([2, 4], [8.0, 6.0]), "train/kl": ([2, 4], [0.5, 0.4]), "eval/top1": ([4], [30.0])}
    old_plain = {"train/ce": ([2, 4], [4.0, 3.0])}
    rdrop_curves = plot_curves.panel_curves(old_rdrop)
    assert rdrop_curves["cross_entropy"] == ([2, 4], [4.0, 3.0], None)
    assert rdrop_curves["symmetric_kl"] == ([2, 4], [0.5, 0.4], None)
    assert rdrop_curves["top1"] == ([4], [30.0], "split not recorded")
    assert plot_curves.panel_curves(old_plain) == {"cross_entropy": ([2, 4], [4.0, 3.0], None)}


def test_sessions_of_a_resumed_run_are_merged_the_later_one_winning(tmp_path):
    run = tmp_path / "resumed"
    # Killed after logging step 4 past its step-3 checkpoint; the resumed session logs 4 and 6 again.
    write_session(run, "vdlrecords.100.log", {"train/objective": [(2, 4.0), (4, 3.9)]})
    write_session(run, "vdlrecords.200.log", {"train/objective": [(4, 3.5), (6, 3.0)]})
    files = plot_curves.visualdl_files(str(run))
    scalars = plot_curves.read_scalars(files, ["train/objective", "eval/top1"])
    steps, values = scalars["train/objective"]
    assert steps == [2, 4, 6]
    np.testing.assert_allclose(values, [4.0, 3.5, 3.0])
    assert "eval/top1" not in scalars


def test_runs_with_the_same_folder_name_are_told_apart():
    assert plot_curves.run_labels(["a/run", "b/run", "c/other"]) == ["a/run", "b/run", "other"]


def test_a_folder_without_visualdl_logs_is_a_user_error(tmp_path, capsys):
    (tmp_path / "empty" / "vdl").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_info:
        plot_curves.main([str(tmp_path / "empty"), "--output", str(tmp_path / "curves.png")])
    message = capsys.readouterr().err
    assert exit_info.value.code == 2 and str(tmp_path / "empty") in message and "VisualDL" in message
    assert not (tmp_path / "curves.png").exists()
