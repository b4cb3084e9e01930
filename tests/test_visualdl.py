"""What VisualDL shows of a run, read through VisualDL's own server API (what its web page shows):
one run per training folder with every scalar at every step exactly once, however often the run was
killed and resumed, and a hyper-parameter table with names the page displays.

The page itself is checked by hand, not here (CI would need a browser): with a run in output/,

    visualdl --logdir output --host 127.0.0.1 --port 8040 --language en &
    chromium --headless --no-sandbox --disable-gpu --window-size=1600,1000 --virtual-time-budget=15000 \
        --user-data-dir=$(mktemp -d) --screenshot=scalars.png http://127.0.0.1:8040/app/scalar

and the same for http://127.0.0.1:8040/app/hyper-parameter: one line per tag, and a table whose
cells are filled (names with a dot would leave them blank).
"""

import json
import shutil

from rdrop import checkpoint, logs
from rdrop.distributed import Context

import pytest
from run_helpers import tiny_config

import train


def visualdl_api(logdir):
    from visualdl.server.api import create_api_call
    from visualdl.server.data_manager import default_data_manager

    default_data_manager.__init__()  # VisualDL keeps one record store per process: start empty, as a new server
    call = create_api_call(str(logdir), None, 0)

    def get(path, **args):
        answer = json.loads(call(path, args)[0])
        assert answer["status"] == 0, answer
        return answer["data"]

    return get


def kill_after_last_checkpoint(run):
    """What a kill between two checkpoints leaves: steps logged after the newest checkpoint kept."""
    newest_step, newest = checkpoint.list_checkpoints(str(run))[-1]
    shutil.rmtree(newest)
    return newest_step


@pytest.mark.slow
def test_a_run_killed_and_resumed_twice_is_one_run_with_every_step_once(tmp_path, archive):
    config = tiny_config(tmp_path, archive, train={"log_every": 1}, data={"val_size": 8})
    run = tmp_path / "run"
    train.main(["--config", config])
    for _ in range(2):
        kill_after_last_checkpoint(run)  # the session had logged steps 4-6 before it died
        train.main(["--config", config, "-o", "train.resume=auto"])
    assert len(list((run / logs.VISUALDL_DIR).glob("vdlrecords.*.log"))) == 1

    api = visualdl_api(tmp_path)
    name = str(run / logs.VISUALDL_DIR)  # VisualDL names a run by its folder
    assert api("runs") == [name]
    scalar_tags = api("scalar/tags")
    assert scalar_tags["runs"] == [name]
    (tags,) = scalar_tags["tags"]
    expected_steps = {
        **{f"train/{name}": list(range(1, 7)) for name in ("objective", "cross_entropy", "symmetric_kl", "lr")},
        **{f"val/{name}": [3, 6] for name in ("top1", "top5", "cross_entropy")},
    }
    assert set(expected_steps) <= set(tags)
    assert not any(tag.startswith("eval/") or tag.startswith("test/") for tag in tags)
    for tag, steps in expected_steps.items():
        points = api("scalar/list", run=name, tag=tag)
        assert [step for _, step, _ in points] == steps, tag


def test_hyperparameters_have_names_the_table_shows(tmp_path, archive):
    train.main(["--config", tiny_config(tmp_path, archive, schedule={"total_steps": 3, "warmup_steps": 1})])
    (row,) = visualdl_api(tmp_path)("hparams/list")
    assert row["name"] == str(tmp_path / "run" / logs.VISUALDL_DIR)
    names = set(row["hparams"])
    assert {"model_name", "optimizer_lr", "rdrop_alpha", "train_global_batch_size"} <= names
    assert not any("." in name for name in names)  # VisualDL's table leaves such cells blank
    assert row["hparams"]["optimizer_lr"] == pytest.approx(0.05)
    assert row["hparams"]["model_name"] == "vit"
    assert "model_pretrained" in names  # what the run started from defines it, although a resume may drop it
    settings = ("train_output_dir", "train_resume", "train_log_every", "train_eval_every", "train_save_every")
    assert not names & {*settings, "data_num_workers", "train_keep_checkpoints", "eval_batch_size"}
    assert set(row["metrics"]) == {"test/top1", "test/top5", "test/cross_entropy"}


def test_a_running_run_shows_its_hyperparameters_and_the_metrics_so_far(tmp_path):
    writer = logs.MetricsWriter(Context(0, 1), str(tmp_path / "run"), 0, {"lr": 0.1}, ["val/top1"])
    api = visualdl_api(tmp_path)
    (row,) = api("hparams/list")
    assert row["hparams"] == {"lr": pytest.approx(0.1)}
    writer.scalars("val", {"top1": 12.5}, 3)
    (row,) = visualdl_api(tmp_path)("hparams/list")
    assert row["metrics"] == {"val/top1": 12.5}
    writer.close()


def test_a_log_torn_by_a_kill_keeps_every_record_before_the_tear(tmp_path):
    run = tmp_path / "run"
    first = logs.MetricsWriter(Context(0, 1), str(run), 0, {"lr": 0.1}, [])
    for step in range(1, 7):
        first.scalars("train", {"objective": 10.0 - step}, step)
    first.close()
    (log_file,) = (run / logs.VISUALDL_DIR).iterdir()
    log_file.write_bytes(log_file.read_bytes()[:-5])  # the kill hit while step 6 was being written
    resumed = logs.MetricsWriter(Context(0, 1), str(run), 4, {"lr": 0.1}, [])
    resumed.scalars("train", {"objective": 1.5}, 5)
    resumed.close()
    points = visualdl_api(tmp_path)("scalar/list", run=str(run / logs.VISUALDL_DIR), tag="train/objective")
    assert [(step, value) for _, step, value in points] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 1.5)]
