"""train.py end to end on a tiny generated CIFAR-100 archive: outputs, exact resume, accumulation,
the learning rate actually used, and the multi-process path through Paddle's launcher."""
import json
import os
import subprocess
import sys

import numpy as np
import paddle
import pytest
import yaml

import train
from cifar_archive import write_cifar100_archive
from rdrop import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(tmp_path, archive, name="run", **sections):
    cfg = {
        "model": {"name": "vit", "img_size": 16, "num_classes": 100, "patch_size": 4, "embed_dim": 16,
                  "depth": 2, "num_heads": 2, "mlp_dim": 32, "dropout": 0.1},
        "rdrop": {"alpha": 0.3, "kl_reduction": "sum"},
        "data": {"dataset": "cifar100", "data_file": str(archive), "download": False, "num_workers": 0},
        "optimizer": {"name": "momentum", "lr": 0.05, "grad_clip": 1.0},
        "schedule": {"name": "warmup_cosine", "warmup_steps": 2, "total_steps": 6},
        "train": {"global_batch_size": 8, "micro_batch_size": 4, "eval_every": 3, "save_every": 3,
                  "log_every": 2, "output_dir": str(tmp_path / name), "cpu_threads": 1},
        "eval": {"batch_size": 16},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return write_cifar100_archive(tmp_path_factory.mktemp("cifar") / "cifar-100-python.tar.gz",
                                  num_train=48, num_test=21)


def final_weights(output_dir):
    step, path = checkpoint.list_checkpoints(str(output_dir))[-1]
    return step, {name: value.numpy() for name, value in paddle.load(os.path.join(path, "model.pdparams")).items()}


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=atol, err_msg=name)


def test_a_run_writes_every_output(tmp_path, archive):
    train.main(["--config", tiny_config(tmp_path, archive)])
    run = tmp_path / "run"
    for name in ("config.yaml", "train.log", "best.pdparams", "best.json", "vdl"):
        assert (run / name).exists(), name
    assert [step for step, _ in checkpoint.list_checkpoints(str(run))] == [3, 6]
    best = json.loads((run / "best.json").read_text())
    assert best["split"] == "test" and best["step"] in (3, 6)
    log = (run / "train.log").read_text()
    assert "step 6/6" in log and "on test" in log

    from visualdl import LogReader
    reader = LogReader(file_path=str(next((run / "vdl").iterdir())))
    tags = set(reader.get_tags()["scalar"])
    assert {"train/loss", "train/ce", "train/kl", "train/lr", "train/grad_norm", "train/img_per_s",
            "eval/top1", "eval/top5", "eval/loss"} <= tags
    assert [record.id for record in reader.get_data("scalar", "train/loss")] == [2, 4, 6]


def test_resumed_run_ends_with_bitwise_identical_weights(tmp_path, archive):
    train.main(["--config", tiny_config(tmp_path, archive, "full")])
    _, uninterrupted = final_weights(tmp_path / "full")
    # Resume a second run from the step-3 checkpoint the first run wrote.
    resume_from = tmp_path / "full" / "checkpoints" / "step_3"
    train.main(["--config", tiny_config(tmp_path, archive, "resumed"), "-o", f"train.resume={resume_from}"])
    step, resumed = final_weights(tmp_path / "resumed")
    assert step == 6
    assert_same_weights(uninterrupted, resumed)


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, archive):
    no_dropout = {"dropout": 0.0}
    train.main(["--config", tiny_config(tmp_path, archive, "one", model=no_dropout,
                                        train={"micro_batch_size": 8})])
    train.main(["--config", tiny_config(tmp_path, archive, "two", model=no_dropout,
                                        train={"micro_batch_size": 4})])
    assert_same_weights(final_weights(tmp_path / "one")[1], final_weights(tmp_path / "two")[1], atol=2e-6)


def test_indivisible_batch_sizes_are_refused(tmp_path, archive, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", tiny_config(tmp_path, archive), "-o", "train.micro_batch_size=3"])
    assert exit_info.value.code == 2
    assert "must be a multiple of train.micro_batch_size" in capsys.readouterr().err


def launch(args, log_dir, processes=2, timeout=600):
    command = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", str(processes),
               "--log_dir", str(log_dir), "train.py"] + args
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_match_one_process_with_accumulation(tmp_path, archive):
    """2 ranks x 1 micro-batch of 4 see the same 8 images per step as 1 rank x 2 micro-batches of 4."""
    no_dropout = {"dropout": 0.0}
    result = launch(["--config", tiny_config(tmp_path, archive, "ranks", model=no_dropout)], tmp_path / "logs")
    logs = "".join(path.read_text() for path in (tmp_path / "logs").glob("workerlog.*"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    train.main(["--config", tiny_config(tmp_path, archive, "single", model=no_dropout)])
    assert_same_weights(final_weights(tmp_path / "ranks")[1], final_weights(tmp_path / "single")[1], atol=2e-6)
    # Only rank 0 writes, and both ranks report the same, exactly counted evaluation.
    assert (tmp_path / "ranks" / "train.log").read_text().count("(21 images;") == 2
    assert "max drift across ranks 0.000e+00" in (tmp_path / "ranks" / "train.log").read_text()
