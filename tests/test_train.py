"""train.py end to end on a tiny generated CIFAR-100 archive: outputs, exact resume, accumulation,
the learning rate actually used, and the multi-process path through Paddle's launcher."""

import json

from rdrop import checkpoint, distributed

import paddle
import pytest
from run_helpers import assert_same_weights, final_weights, launch, tiny_config

import train


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
    assert {
        "train/objective",
        "train/cross_entropy",
        "train/symmetric_kl",
        "train/lr",
        "train/grad_norm",
        "train/img_per_s",
        "test/top1",
        "test/top5",
        "test/cross_entropy",
    } <= tags
    assert [record.id for record in reader.get_data("scalar", "train/objective")] == [2, 4, 6]


def test_resumed_run_ends_with_bitwise_identical_weights(tmp_path, archive, monkeypatch):
    train.main(["--config", tiny_config(tmp_path, archive, "full")])
    _, uninterrupted = final_weights(tmp_path / "full")
    # Resume a second run from the step-3 checkpoint the first run wrote, recording the weights the
    # distributed wrap receives: fleet broadcasts rank 0's parameters there, so they must be the
    # checkpoint's already.
    resume_from = tmp_path / "full" / "checkpoints" / "step_3"
    wrapped, wrap = [], distributed.wrap

    def recording_wrap(model, optimizer, context):
        wrapped.append({name: value.numpy() for name, value in model.state_dict().items()})
        return wrap(model, optimizer, context)

    monkeypatch.setattr(distributed, "wrap", recording_wrap)
    train.main(["--config", tiny_config(tmp_path, archive, "resumed"), "-o", f"train.resume={resume_from}"])
    step, resumed = final_weights(tmp_path / "resumed")
    assert step == 6
    assert_same_weights(uninterrupted, resumed)
    saved = paddle.load(str(resume_from / checkpoint.MODEL_FILE))
    assert len(wrapped) == 1
    assert_same_weights(wrapped[0], {name: value.numpy() for name, value in saved.items()})


def test_device_augment_trains_as_the_host_path_does(tmp_path, archive):
    """data.device_augment moves the crops onto the device; the model must see the same images."""
    short = {"schedule": {"warmup_steps": 1, "total_steps": 2}, "train": {"eval_every": 0, "save_every": 0}}
    train.main(["--config", tiny_config(tmp_path, archive, "host", **short)])
    short["data"] = {"device_augment": True}
    train.main(["--config", tiny_config(tmp_path, archive, "device", **short)])
    host, device = final_weights(tmp_path / "host"), final_weights(tmp_path / "device")
    assert host[0] == device[0] == 2
    assert_same_weights(host[1], device[1], atol=1e-5)


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path, archive):
    no_dropout = {"dropout": 0.0}
    train.main(["--config", tiny_config(tmp_path, archive, "one", model=no_dropout, train={"micro_batch_size": 8})])
    train.main(["--config", tiny_config(tmp_path, archive, "two", model=no_dropout, train={"micro_batch_size": 4})])
    assert_same_weights(final_weights(tmp_path / "one")[1], final_weights(tmp_path / "two")[1], atol=2e-6)


def test_indivisible_batch_sizes_are_refused(tmp_path, archive, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", tiny_config(tmp_path, archive), "-o", "train.micro_batch_size=3"])
    assert exit_info.value.code == 2
    assert "must be a multiple of train.micro_batch_size" in capsys.readouterr().err


def test_a_mistyped_model_name_names_the_closest_one_before_anything_is_written(tmp_path, archive, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--config", tiny_config(tmp_path, archive), "-o", "model.name=vit_b61"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err.strip()
    assert "model.name 'vit_b61' is not a known model. Did you mean 'vit_b16'?" in message
    assert "\n" not in message and "Traceback" not in message
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("micro_batch_size", [4, 2], ids=["1_micro_batch_per_rank", "2_micro_batches_per_rank"])
def test_two_processes_match_one_process_with_accumulation(tmp_path, archive, micro_batch_size):
    """8 images per step, R-Drop on: 2 ranks x 1 micro-batch of 4 against 1 rank x 2 of 4, and 2 ranks
    x 2 micro-batches of 2 (gradients accumulated under no_sync, all-reduced on the last) against
    1 rank x 4 of 2."""
    # Without clipping, which would hide gradients scaled by a wrong factor.
    sections = {
        "model": {"dropout": 0.0},
        "train": {"micro_batch_size": micro_batch_size},
        "optimizer": {"grad_clip": None},
    }
    result = launch(["--config", tiny_config(tmp_path, archive, "ranks", **sections)], tmp_path / "logs")
    logs = "".join(path.read_text() for path in (tmp_path / "logs").glob("workerlog.*"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    assert f"2 process(es) x {4 // micro_batch_size} micro-batch(es) of {micro_batch_size}" in logs
    train.main(["--config", tiny_config(tmp_path, archive, "single", **sections)])
    assert_same_weights(final_weights(tmp_path / "ranks")[1], final_weights(tmp_path / "single")[1], atol=2e-6)
    # Only rank 0 writes, and both ranks report the same evaluation of every image counted once.
    assert (tmp_path / "ranks" / "train.log").read_text().count("(21 images;") == 2
    assert "max drift across ranks 0.000e+00" in (tmp_path / "ranks" / "train.log").read_text()


def test_the_closing_test_line_says_which_weights_scored_it(tmp_path, archive):
    train.main(["--config", tiny_config(tmp_path, archive, data={"val_size": 8})])
    run = tmp_path / "run"
    best_step = json.loads((run / "best.json").read_text())["step"]
    (line,) = [line for line in (run / "train.log").read_text().splitlines() if "Test split" in line]
    assert "weights of the last step (6)" in line
    if best_step == 6:
        assert "also the best on val" in line
    else:
        assert f"not the best-on-val weights; test those with: python eval.py --checkpoint {run}/best.pdparams" in line


@pytest.mark.parametrize("split", ["test", "val"])
def test_the_log_and_best_json_name_the_selection_split_and_the_end_the_last_steps_test_top1(tmp_path, archive, split):
    train.main(["--config", tiny_config(tmp_path, archive, data={"val_size": 8 if split == "val" else 0})])
    run = tmp_path / "run"
    best = json.loads((run / "best.json").read_text())
    assert best["split"] == split
    lines = (run / "train.log").read_text().splitlines()
    assert any(f"Model selection on the {split} split" in line for line in lines)
    evaluations = [line for line in lines if " eval step " in line]
    assert len(evaluations) == 2 and all(f" on {split}: " in line for line in evaluations)
    # The last step's test top-1, as the line that measured it printed it.
    measured = evaluations[-1] if split == "test" else next(line for line in lines if "Test split" in line)
    last_top1 = measured.split("top1 ")[1].split()[0]
    (done,) = [line for line in lines if "Done: " in line]
    assert f"best {split} top1 {best['top1']:.2f} at step {best['step']} (selected on the {split} split" in done
    assert f"last step (6) test top1 {last_top1}" in done
    assert ("optimistic" in done) == (split == "test")
