"""No file is written through a symbolic link planted in the output folder, at any name a run writes:
the run refuses with one paragraph and exit 2, and the file the link points to is untouched. Each
writer also refuses a link on its own, for a link planted after the run checked its folder."""

import os

from rdrop import atomic, checkpoint, config, logs, output_folder
from rdrop.distributed import Context
from rdrop.errors import UserError

import pytest
from run_helpers import tiny_config

import eval as eval_script
import train

WRITTEN_NAMES = [
    output_folder.LOCK_FILE,
    logs.LOG_FILE,
    checkpoint.RUN_CONFIG,
    checkpoint.CHECKPOINTS,
    checkpoint.BEST_WEIGHTS,
    checkpoint.BEST_METRICS,
    logs.VISUALDL_DIR,
]
VICTIM_TEXT = "someone else's file\n"


def plant(link, tmp_path, folder=False):
    """A link at `link` to a file (or a folder holding one) outside the run; returns what to check."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text(VICTIM_TEXT)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(victim if folder else victim / "file", link)
    return victim


def untouched(victim):
    return sorted(os.listdir(victim)) == ["file"] and (victim / "file").read_text() == VICTIM_TEXT


def refused(capsys, link, run):
    with pytest.raises(SystemExit) as caught:
        run()
    stderr = capsys.readouterr().err
    assert caught.value.code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and f"'{link}' is a symbolic link" in stderr


@pytest.mark.parametrize("name", WRITTEN_NAMES)
def test_a_run_refuses_a_link_planted_at_a_name_it_writes(tmp_path, archive, capsys, name):
    run_config = tiny_config(tmp_path, archive, schedule={"total_steps": 1, "warmup_steps": 0})
    link = tmp_path / "run" / name
    victim = plant(link, tmp_path, folder=name in (checkpoint.CHECKPOINTS, logs.VISUALDL_DIR))
    refused(capsys, link, lambda: train.main(["--config", run_config]))
    assert untouched(victim)


def test_the_lock_train_log_and_visualdl_records_refuse_a_link_on_their_own(tmp_path):
    run = tmp_path / "run"
    for name, write in [
        (output_folder.LOCK_FILE, lambda: output_folder.lock(str(run))),
        (logs.LOG_FILE, lambda: logs.setup(Context(0, 1), str(run))),
        (logs.VISUALDL_DIR, lambda: logs.MetricsWriter(Context(0, 1), str(run), 0, {}, [])),
    ]:
        victim = plant(run / name, tmp_path, folder=name == logs.VISUALDL_DIR)
        with pytest.raises(UserError, match="is a symbolic link"):
            write()
        assert untouched(victim)
        os.remove(run / name)
        os.rename(victim, tmp_path / f"checked_{name}")
    logs.setup_single_process()  # leave logging as it was


def test_replaced_files_refuse_a_link_at_their_name_and_remove_one_at_their_partial_name(tmp_path):
    target = tmp_path / "run" / checkpoint.RUN_CONFIG
    victim = plant(target, tmp_path)
    with pytest.raises(UserError, match="is a symbolic link"):
        config.save(config.defaults(), str(target))
    assert untouched(victim)
    os.remove(target)
    os.symlink(victim / "file", atomic.partial_path(target))  # where the new version is written first
    config.save(config.defaults(), str(target))
    assert untouched(victim) and not os.path.islink(target) and not os.path.lexists(atomic.partial_path(target))


def test_eval_refuses_a_link_as_its_output_before_evaluating(tmp_path, capsys):
    link = tmp_path / "metrics.json"
    victim = plant(link, tmp_path)
    refused(capsys, link, lambda: eval_script.main(["--checkpoint", str(tmp_path / "none"), "--output", str(link)]))
    assert untouched(victim)
