"""The VisualDL history of a run survives what happens to its records file: damage anywhere in it, and
a full disk while a resume copies it. What VisualDL shows is read with VisualDL's own LogReader."""

import logging
import os
import shutil
import subprocess
import sys
import textwrap

from rdrop import logs
from rdrop.distributed import Context

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = Context(0, 1)


def shown_scalars(folder):
    """{(tag, step): value} of the file VisualDL shows for `folder` (the newest), read by VisualDL."""
    from visualdl import LogReader

    (newest,) = sorted(name for name in os.listdir(folder) if "vdlrecords" in name)[-1:]
    reader = LogReader(file_path=os.path.join(folder, newest))
    return {
        (tag, point.id): point.value
        for tag in reader.get_tags().get("scalar", [])
        for point in reader.get_data("scalar", tag)
    }


def log_steps(run, steps, values):
    writer = logs.MetricsWriter(MAIN, str(run), 0, {"lr": 0.1}, ["val/top1"])
    for step in steps:
        writer.scalars("train", values(step), step)
    writer.close()


@pytest.mark.slow
def test_a_byte_flipped_anywhere_costs_only_the_records_it_hits_and_is_reported(tmp_path, caplog):
    intact_run = tmp_path / "intact"
    log_steps(intact_run, range(1, 7), lambda step: {"objective": 10.0 - step, "lr": step / 8})
    intact_folder = intact_run / logs.VISUALDL_DIR
    (records_file,) = intact_folder.iterdir()
    intact = shown_scalars(intact_folder)
    assert len(intact) == 12  # what was logged, read back by VisualDL
    resume_step = 4
    expected = {key: value for key, value in intact.items() if key[1] <= resume_step}
    data = records_file.read_bytes()
    for position in range(len(data)):
        run = tmp_path / f"flip{position}"
        shutil.copytree(intact_run, run)
        damaged = bytearray(data)
        damaged[position] ^= 0xFF
        (run / logs.VISUALDL_DIR / records_file.name).write_bytes(bytes(damaged))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="rdrop.logs"):
            logs.MetricsWriter(MAIN, str(run), resume_step, {"lr": 0.1}, ["val/top1"]).close()
        copied = shown_scalars(run / logs.VISUALDL_DIR)
        assert set(copied) <= set(expected), position
        assert all(copied[key] == expected[key] for key in copied), position  # never a wrong value
        reports = [record.getMessage() for record in caplog.records]
        assert len(reports) == 1 and records_file.name in reports[0] and "dropped" in reports[0], position
        assert len(os.listdir(run / logs.VISUALDL_DIR)) == 1
        shutil.rmtree(run)


FILL_AND_RESUME = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {root!r})
    from rdrop import logs
    from rdrop.distributed import Context
    from rdrop.errors import exit_on_user_error

    run = sys.argv[1]

    @exit_on_user_error
    def resume():
        logs.MetricsWriter(Context(0, 1), run, 400, {{"lr": 0.1}}, []).close()

    if sys.argv[2] == "fill":
        writer = logs.MetricsWriter(Context(0, 1), run, 0, {{"lr": 0.1}}, [])
        for step in range(1, 401):
            writer.scalars("train", {{"objective": step / 4, "cross_entropy": step / 8}}, step)
        writer.close()
        with open(os.path.join(os.path.dirname(run), "filler"), "wb") as filler:
            try:
                filler.write(b"x" * (1 << 20))  # leaves the disk full, or nearly
            except OSError:
                pass
    else:
        resume()
    """
)


def test_a_full_disk_while_a_resume_copies_the_history_keeps_the_earlier_file(tmp_path):
    """A 128 KB tmpfs in a mount namespace of its own: the copy cannot fit beside the earlier file."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs unshare -m (root or user namespaces) to mount a small tmpfs")
    script = tmp_path / "fill_and_resume.py"
    script.write_text(FILL_AND_RESUME.format(root=ROOT))
    disk = tmp_path / "disk"
    disk.mkdir()
    commands = (
        f"mount -t tmpfs -o size=128k tmpfs {disk} && {sys.executable} {script} {disk}/run fill && "
        f"cp -a {disk}/run {tmp_path}/before && {sys.executable} {script} {disk}/run resume 2> {tmp_path}/stderr; "
        f"echo $? > {tmp_path}/rc; cp -a {disk}/run {tmp_path}/after"
    )
    subprocess.run(["unshare", "-m", "sh", "-c", commands], check=True)
    assert (tmp_path / "rc").read_text().strip() == "2"
    stderr = (tmp_path / "stderr").read_text()
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "No space left on device" in stderr and "kept unchanged" in stderr
    before, after = (tmp_path / state / logs.VISUALDL_DIR for state in ("before", "after"))
    assert sorted(os.listdir(after)) == sorted(os.listdir(before))  # the earlier file, and no partial copy
    for name in os.listdir(before):
        assert (after / name).read_bytes() == (before / name).read_bytes()
    assert shown_scalars(after) == {
        **{("train/objective", step): step / 4 for step in range(1, 401)},
        **{("train/cross_entropy", step): step / 8 for step in range(1, 401)},
    }


def test_a_file_written_before_records_carried_checksums_is_still_copied(tmp_path):
    from visualdl import LogWriter

    folder = tmp_path / "run" / logs.VISUALDL_DIR
    with LogWriter(logdir=str(folder), file_name="vdlrecords.1.log") as writer:
        for step in range(1, 5):
            writer.add_scalar(tag="train/objective", value=step / 2, step=step)
    logs.MetricsWriter(MAIN, str(tmp_path / "run"), 3, {"lr": 0.1}, []).close()
    assert shown_scalars(folder) == {("train/objective", step): step / 2 for step in (1, 2, 3)}
    assert len(os.listdir(folder)) == 1


def test_a_run_starting_at_step_zero_replaces_the_earlier_records(tmp_path):
    """What train.overwrite's documentation says of a new run in another run's folder."""
    log_steps(tmp_path / "run", range(1, 5), lambda step: {"objective": float(step)})
    log_steps(tmp_path / "run", range(1, 3), lambda step: {"cross_entropy": step / 4})
    folder = tmp_path / "run" / logs.VISUALDL_DIR
    assert shown_scalars(folder) == {("train/cross_entropy", 1): 0.25, ("train/cross_entropy", 2): 0.5}
    assert len(os.listdir(folder)) == 1
