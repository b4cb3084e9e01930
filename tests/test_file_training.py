"""Folder and file-list datasets through the loaders, train.py, eval.py and export: the guarantees
CIFAR-100 has (disjoint reshuffled shards, every test image once, class-balanced val, exact resume,
workers invisible), the mid-run policy for files that stop decoding, and bad input exiting 2.

The images are flat colours (tests/image_trees.py), so a batch tells which files it holds."""

import json
import os
import shutil
import signal

from rdrop import checkpoint
from rdrop.errors import UserError

import numpy as np
import pytest
from data_helpers import make_cfg
from image_trees import serials_in, write_coloured_tree, write_file_list
from run_helpers import assert_same_weights, final_weights, launch, load_script, tiny_config
from test_faults import start_launched, wait_for_step, worker_logs

import data
import eval as evaluate_script
import train
from data import transforms

TRAIN_COUNTS = {"wren": 7, "Crow": 5, "owl": 6, "finch": 4}  # 22 images
TEST_COUNTS = {"owl": 4, "wren": 4, "Crow": 3}  # 11: not divisible by 2 or 3; finch has no test images
CLASSES = ("Crow", "finch", "owl", "wren")  # sorted


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(train_dir, test_dir, {serial: label} of train, {serial: label} of test)."""
    root = tmp_path_factory.mktemp("folders")
    train_serials = write_coloured_tree(root / "train", TRAIN_COUNTS)
    test_serials = write_coloured_tree(root / "val", TEST_COUNTS, first_serial=100, seed=1)

    def labels(serials):
        return {serial: CLASSES.index(path.split("/")[0]) for path, serial in serials.items()}

    return root / "train", root / "val", labels(train_serials), labels(test_serials)


def folder_cfg(folders, **knobs):
    knobs.setdefault("img_size", 8)
    return make_cfg(None, dataset="folder", train_dir=str(folders[0]), test_dir=str(folders[1]), num_classes=4, **knobs)


def epoch_serials(cfg, world_size, epochs=2):
    """[epoch][rank] -> serials read, with labels checked against the files' classes."""
    streams = [data.TrainStream(cfg, rank, world_size) for rank in range(world_size)]
    result = []
    for _ in range(epochs):
        per_rank = []
        for stream in streams:
            seen = []
            for _ in range(stream.batches_per_epoch):
                images, labels = next(stream)
                seen += list(zip(serials_in(images), labels.numpy().tolist()))
            per_rank.append(seen)
        result.append(per_rank)
    for stream in streams:
        stream.close()
    return result


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_training_shards_are_disjoint_labelled_and_reshuffled_every_epoch(folders, world_size):
    cfg = folder_cfg(folders, micro_batch_size=2)
    epochs = epoch_serials(cfg, world_size)
    step = 2 * world_size
    orders = []
    for per_rank in epochs:
        serials = [serial for seen in per_rank for serial, _ in seen]
        assert len(serials) == len(set(serials)) == 22 // step * step
        assert set(serials) <= set(folders[2])
        assert all(label == folders[2][serial] for seen in per_rank for serial, label in seen)
        orders.append(serials)
    assert orders[0] != orders[1]


def test_a_global_step_covers_the_same_files_for_any_world_size(folders):
    one = epoch_serials(folder_cfg(folders, micro_batch_size=6), 1, epochs=1)[0][0]
    three = epoch_serials(folder_cfg(folders, micro_batch_size=2), 3, epochs=1)[0]
    for step in range(len(one) // 6):
        assert {s for s, _ in one[6 * step : 6 * step + 6]} == {
            s for rank in three for s, _ in rank[2 * step : 2 * step + 2]
        }


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_test_file_is_evaluated_once(folders, world_size):
    seen = []
    for rank in range(world_size):
        for images, labels in data.build_eval_loader(folder_cfg(folders, eval_batch_size=3), "test", rank, world_size):
            seen += list(zip(serials_in(images), labels.numpy().tolist()))
    assert sorted(seen) == sorted(folders[3].items())


def test_validation_split_is_carved_class_balanced_from_the_training_files(folders):
    cfg = folder_cfg(folders, val_size=8)
    val = [s for images, _ in data.build_eval_loader(cfg, "val", 0, 1) for s in serials_in(images)]
    train_serials = {
        s for rank in epoch_serials(dict(cfg, train=dict(cfg["train"], micro_batch_size=2)), 1, 1)[0] for s, _ in rank
    }
    assert len(val) == len(set(val)) == 8 and not set(val) & train_serials
    assert sorted(np.bincount([folders[2][s] for s in val], minlength=4)) == [2, 2, 2, 2]


def test_worker_processes_and_resume_give_the_same_batches(folders):
    cfg = folder_cfg(folders, micro_batch_size=3)
    reference = data.TrainStream(cfg, 0, 1)
    expected = [next(reference) for _ in range(10)]
    reference.close()
    with_workers = data.TrainStream(folder_cfg(folders, micro_batch_size=3, num_workers=2), 0, 1)
    for _ in range(4):
        next(with_workers)
    resumed = data.TrainStream(cfg, 0, 1)
    resumed.set_state_dict(with_workers.state_dict())
    with_workers.close()
    for (images, labels), (want_images, want_labels) in zip((next(resumed) for _ in range(6)), expected[4:]):
        np.testing.assert_array_equal(images.numpy(), want_images.numpy())
        np.testing.assert_array_equal(labels.numpy(), want_labels.numpy())
    resumed.close()


def test_resuming_on_changed_files_is_refused(folders, tmp_path):
    shutil.copytree(folders[0], tmp_path / "train")
    cfg = make_cfg(None, dataset="folder", train_dir=str(tmp_path / "train"), test_dir=str(folders[1]), num_classes=4)
    state = data.TrainStream(cfg, 0, 1).state_dict()
    os.rename(tmp_path / "train" / "owl" / "000.png", tmp_path / "train" / "owl" / "renamed.png")
    data.datasets._indexed.cache_clear()
    with pytest.raises(UserError, match="other files or labels"):
        data.TrainStream(cfg, 0, 1).set_state_dict(state)


def test_a_file_that_stops_decoding_is_replaced_in_training_and_left_out_of_evaluation(folders, tmp_path, caplog):
    shutil.copytree(folders[0], tmp_path / "train")
    shutil.copytree(folders[1], tmp_path / "val")
    cfg = make_cfg(None, dataset="folder", train_dir=str(tmp_path / "train"), test_dir=str(tmp_path / "val"))
    cfg = dict(cfg, model={"img_size": 8, "num_classes": 4}, train=dict(cfg["train"], micro_batch_size=11))
    data.datasets._indexed.cache_clear()
    data.prepare_dataset(cfg)  # the start-of-run check passes
    stream = data.TrainStream(cfg, 0, 1)
    loader = data.build_eval_loader(cfg, "test", 0, 1)
    next((tmp_path / "train" / "owl").glob("005.*")).write_bytes(b"damaged after the check")
    next((tmp_path / "val" / "owl").glob("000.*")).write_bytes(b"")
    serials = [s for _ in range(stream.batches_per_epoch) for s in serials_in(next(stream)[0])]
    # index order: Crow 0-4, finch 5-8, owl 9-14, wren 15-21; owl/005 (index 14) is replaced by wren/000 (15)
    damaged, replacement = folders_serial(folders[2], "owl", 5), folders_serial(folders[2], "wren", 0)
    assert damaged not in serials and serials.count(replacement) == 2 and len(serials) == 22
    assert stream.take_unreadable_count() == 1 and stream.take_unreadable_count() == 0
    evaluated = [s for images, _ in loader for s in serials_in(images)]
    assert len(evaluated) == 10 and loader.unreadable_images == 1
    assert sum("cannot be decoded any more" in record.message for record in caplog.records) == 2
    stream.close()


def folders_serial(labels_by_serial, class_name, index):
    """The serial of TRAIN_COUNTS' file <class_name>/<index>, in writing order."""
    serial = 0
    for name, count in TRAIN_COUNTS.items():
        if name == class_name:
            return serial + index
        serial += count
    raise KeyError(class_name)


def test_device_augment_is_refused_for_image_files_in_one_paragraph(folders):
    with pytest.raises(UserError, match="data.device_augment: false") as caught:
        data.TrainStream(folder_cfg(folders, device_augment=True), 0, 1)
    assert "\n" not in str(caught.value)


def test_file_lists_stream_the_same_files_as_the_folders(folders, tmp_path):
    labels = {rel: CLASSES.index(rel.split("/")[0]) for rel in _relative_files(folders[0])}
    train_list = write_file_list(
        tmp_path / "train_list.txt", [(f"train/{rel}", label) for rel, label in labels.items()]
    )
    test_rel = _relative_files(folders[1])
    test_list = write_file_list(
        tmp_path / "val_list.txt", [(f"val/{rel}", CLASSES.index(rel.split("/")[0])) for rel in test_rel]
    )
    names = tmp_path / "names.txt"
    names.write_text("".join(f"{i} {name} bird\n" for i, name in enumerate(CLASSES)))
    cfg = make_cfg(
        None,
        dataset="filelist",
        root=str(folders[0].parent),
        train_list=str(train_list),
        test_list=str(test_list),
        class_names_file=str(names),
        num_classes=4,
        img_size=8,
    )
    data.prepare_dataset(cfg)
    assert data.class_names(cfg) == tuple(f"{name} bird" for name in CLASSES)
    seen = [s for images, _ in data.build_eval_loader(cfg, "test", 0, 1) for s in serials_in(images)]
    assert sorted(seen) == sorted(folders[3])


def _relative_files(root):
    return sorted(
        os.path.relpath(os.path.join(folder, name), root) for folder, _, names in os.walk(root) for name in names
    )


# --- through the commands -------------------------------------------------------------------------


def folder_run_config(tmp_path, folders, name="run", **sections):
    data_section = {"dataset": "folder", "data_file": None, "train_dir": str(folders[0]), "test_dir": str(folders[1])}
    sections = {key: dict(value) for key, value in sections.items()}
    sections["data"] = dict(data_section, **sections.get("data", {}))
    sections["model"] = dict(sections.get("model", {}), num_classes=4, img_size=32)
    return tiny_config(tmp_path, "unused", name, **sections)


@pytest.mark.slow
def test_a_folder_run_trains_evaluates_and_exports_with_its_class_names(tmp_path, folders, capsys):
    config_path = folder_run_config(tmp_path, folders, data={"num_workers": 1})
    train.main(["--config", config_path])
    log = (tmp_path / "run" / "train.log").read_text()
    assert "training on 22 images of 4 classes" in log and "Crow, finch, owl, wren" in log
    best = str(tmp_path / "run" / checkpoint.BEST_WEIGHTS)
    metrics = evaluate_script.main(["--checkpoint", best, "--output", str(tmp_path / "m.json")])
    assert metrics["num_samples"] == 11
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["class_names"] == list(CLASSES) and written["per_class_count"] == [3, 0, 4, 4]
    assert "Crow" in capsys.readouterr().out
    export = load_script("export")
    export.main(["--checkpoint", best, "--output", str(tmp_path / "exported")])
    metadata = json.loads((tmp_path / "exported" / "metadata.json").read_text())
    assert metadata["class_names"] == list(CLASSES)
    assert metadata["resize"] == transforms.FILE_RESIZE  # predict prepares files as evaluation did
    predict = load_script("predict")
    results = list(predict.predict(str(tmp_path / "exported"), [str(folders[1] / "owl")], top=4))
    assert len(results) == 4 and all(sorted(n for n, _ in ranked) == sorted(CLASSES) for _, ranked, _ in results)


def test_a_run_logs_and_counts_files_that_stop_decoding(tmp_path, folders, monkeypatch):
    shutil.copytree(folders[0], tmp_path / "train")
    shutil.copytree(folders[1], tmp_path / "val")
    for split in ("train", "val"):
        damaged = next((tmp_path / split / "owl").glob("000.*"))
        damaged.write_bytes(damaged.read_bytes()[:60])
    monkeypatch.setattr(data.image_files, "check_files", lambda file_set, processes: None)  # as if damaged later
    data_section = {"train_dir": str(tmp_path / "train"), "test_dir": str(tmp_path / "val")}
    train.main(["--config", folder_run_config(tmp_path, folders, data=data_section)])
    log = (tmp_path / "run" / "train.log").read_text()
    from visualdl import LogReader

    reader = LogReader(file_path=str(next((tmp_path / "run" / "vdl").iterdir())))
    counts = [record.value for record in reader.get_data("scalar", "train/unreadable_images")]
    replaced = log.count("owl/000.png cannot be decoded any more; trained on the next readable image")
    assert len(counts) == 3 and sum(counts) == replaced > 0
    assert "left out of this evaluation" in log and "(10 images;" in log and "Traceback" not in log


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 3])
def test_every_test_file_is_counted_once_by_eval_on_several_processes(tmp_path, folders, processes):
    config_path = folder_run_config(tmp_path, folders, schedule={"total_steps": 2}, train={"eval_every": 0})
    train.main(["--config", config_path])
    best = str(tmp_path / "run" / checkpoint.BEST_WEIGHTS)
    single = evaluate_script.main(["--checkpoint", best])
    result = launch(
        ["--checkpoint", best, "--output", str(tmp_path / "m.json")], tmp_path / "logs", processes, "eval.py"
    )
    assert result.returncode == 0, result.stdout + result.stderr + worker_logs(tmp_path / "logs")
    several = json.loads((tmp_path / "m.json").read_text())
    assert several["num_samples"] == single["num_samples"] == 11
    assert several["per_class_count"] == single["per_class_count"] == [3, 0, 4, 4]
    assert several["top1"] == single["top1"] and several["class_names"] == list(CLASSES)


@pytest.mark.slow
def test_two_process_folder_run_resumes_bitwise_after_sigkill(tmp_path, folders):
    long_run = {
        "schedule": {"total_steps": 24, "warmup_steps": 2},
        "train": {"log_every": 1, "save_every": 5, "eval_every": 0},
    }
    reference = launch(
        ["--config", folder_run_config(tmp_path, folders, "reference", **long_run)], tmp_path / "ref_logs"
    )
    assert reference.returncode == 0, worker_logs(tmp_path / "ref_logs")
    config_path = folder_run_config(tmp_path, folders, "killed", **long_run)
    job = start_launched(config_path, tmp_path / "kill_logs")
    wait_for_step(tmp_path / "killed" / "train.log", 12, job)
    os.killpg(job.pid, signal.SIGKILL)
    job.communicate(timeout=60)
    assert checkpoint.list_checkpoints(str(tmp_path / "killed"))[-1][0] in (10, 15, 20)
    resumed = launch(["--config", config_path, "-o", "train.resume=auto"], tmp_path / "resume_logs")
    assert resumed.returncode == 0, worker_logs(tmp_path / "resume_logs")
    assert_same_weights(final_weights(tmp_path / "reference")[1], final_weights(tmp_path / "killed")[1])
    assert not os.path.exists(tmp_path / "killed" / "rank1")  # only rank 0 writes
    assert sorted(os.listdir(tmp_path / "killed")) == sorted(os.listdir(tmp_path / "reference"))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("truncated_png", "is not a readable image"),
        ("text_as_jpeg", "is not a readable image"),
        ("empty_class", "holds no image files"),
        ("num_classes", "4 class folders"),
        ("symlink_loop", "symlink loop"),
        ("list_label", "line 2"),
        ("list_missing_file", "does not exist"),
        ("unknown_test_class", "heron"),
    ],
)
def test_bad_files_exit_2_with_one_paragraph_before_training(tmp_path, folders, capsys, case, expected):
    shutil.copytree(folders[0], tmp_path / "train")
    shutil.copytree(folders[1], tmp_path / "val")
    data_section = {"train_dir": str(tmp_path / "train"), "test_dir": str(tmp_path / "val")}
    overrides = []
    if case == "truncated_png":
        whole = (tmp_path / "train" / "owl" / "000.png").read_bytes()
        (tmp_path / "train" / "owl" / "000.png").write_bytes(whole[: len(whole) // 2])
    elif case == "text_as_jpeg":
        (tmp_path / "val" / "owl" / "notes.jpg").write_text("not an image")
    elif case == "empty_class":
        os.makedirs(tmp_path / "train" / "heron")
    elif case == "num_classes":
        overrides = ["-o", "model.num_classes=5"]
    elif case == "symlink_loop":
        os.symlink(tmp_path / "train", tmp_path / "train" / "owl" / "again")
    elif case == "unknown_test_class":
        write_coloured_tree(tmp_path / "val", {"heron": 1})
    else:
        good = "train/owl/000.png 3"
        bad = "train/owl/000.png 4" if case == "list_label" else "train/owl/missing.png 3"
        (tmp_path / "list.txt").write_text(f"{good}\n{bad}\n")
        data_section = {"dataset": "filelist", "root": str(tmp_path), "train_list": str(tmp_path / "list.txt")}
        data_section["test_list"] = data_section["train_list"]
        overrides = ["-o", "train.global_batch_size=2", "-o", "train.micro_batch_size=1"]
    config_path = folder_run_config(tmp_path, folders, data=data_section)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", config_path, *overrides])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert expected in err and "Traceback" not in err
    assert err.startswith("error: ") and err.strip().count("\n") == 0
    assert not checkpoint.list_checkpoints(str(tmp_path / "run"))


def test_ranks_that_indexed_different_files_are_refused(folders):
    stream = data.TrainStream(folder_cfg(folders), 0, 1)
    stream.check_same_files_everywhere(lambda value: [value, value])
    with pytest.raises(UserError, match=r"rank\(s\) \[1\] differ"):
        stream.check_same_files_everywhere(lambda value: [value, "another copy"])


@pytest.mark.slow
def test_a_file_list_run_trains_resumes_and_evaluates_through_the_launcher(tmp_path, folders):
    root = folders[0].parent
    lists = {}
    for split, folder in (("train", folders[0]), ("test", folders[1])):
        entries = [(f"{folder.name}/{rel}", CLASSES.index(rel.split("/")[0])) for rel in _relative_files(folder)]
        lists[split] = str(write_file_list(tmp_path / f"{split}_list.txt", entries))
    data_section = {"dataset": "filelist", "root": str(root), "train_list": lists["train"], "test_list": lists["test"]}
    config_path = folder_run_config(tmp_path, folders, data=dict(data_section, num_workers=1, val_size=4))
    first = launch(["--config", config_path], tmp_path / "logs")
    assert first.returncode == 0, worker_logs(tmp_path / "logs")
    _, finished = final_weights(tmp_path / "run")
    # As if killed after the step-3 checkpoint: drop what came later and resume.
    step, last = checkpoint.list_checkpoints(str(tmp_path / "run"))[-1]
    assert step == 6
    shutil.rmtree(last)
    resumed = launch(["--config", config_path, "-o", "train.resume=auto"], tmp_path / "resume_logs")
    assert resumed.returncode == 0, worker_logs(tmp_path / "resume_logs")
    assert_same_weights(finished, final_weights(tmp_path / "run")[1])
    log = (tmp_path / "run" / "train.log").read_text()
    assert "training on 18 images of 4 classes" in log and "Resumed from" in log
    best = str(tmp_path / "run" / checkpoint.BEST_WEIGHTS)
    result = launch(["--checkpoint", best, "--output", str(tmp_path / "m.json")], tmp_path / "eval_logs", 3, "eval.py")
    assert result.returncode == 0, worker_logs(tmp_path / "eval_logs")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_samples"] == 11 and metrics["class_names"] == ["0", "1", "2", "3"]
