"""eval.py on generated archives: hand-checkable metrics, the run-config discovery, strict weights,
dropout consistency, and exact counting over 2 and 3 processes."""

import json

from rdrop import checkpoint, evaluation, seeding
from rdrop.distributed import Context

import numpy as np
import paddle
import pytest
from cifar_archive import cifar100_arrays, fine_label_names, write_cifar100_archive
from eval_helpers import CHECKPOINT_STEP, fixed_class_weights, random_weights, write_run
from run_helpers import launch
from vit_reference import TINY_MODEL, google_vit_forward, symmetric_kl_rows, write_google_npz

import data
import eval as evaluate_script
import models

NUM_TRAIN, NUM_TEST = 48, 21  # 21 test images: not divisible by 2 or 3 processes


@pytest.fixture(scope="module")
def archive10(tmp_path_factory):
    """10 classes, so the 21 test images give classes of 2 or 3 images each."""
    return write_cifar100_archive(
        tmp_path_factory.mktemp("cifar10") / "cifar-100-python.tar.gz",
        num_train=NUM_TRAIN,
        num_test=NUM_TEST,
        num_classes=10,
    )


def run_eval(capsys, *args):
    """eval.main with `args`; returns (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        evaluate_script.main(list(args))
    return exit_info.value.code, capsys.readouterr().err


def test_fixed_class_model_gives_the_closed_form_metrics(tmp_path, archive10, capsys):
    # Logits equal the head bias for every image: class 7 first, then 2, 9, 0, 4 (the top 5), ...
    # The spread makes some images' loss exceed 64, where Paddle's CPU cross-entropy would clip.
    head_bias = np.zeros(10)
    head_bias[[7, 2, 9, 0, 4, 1, 8, 3, 6, 5]] = 15.0 * np.arange(10)[::-1]
    run, _, _ = write_run(tmp_path, archive10, "fixed", fixed_class_weights(head_bias), model={"num_classes": 10})
    evaluate_script.main(["--checkpoint", str(run / "best.pdparams"), "--output", str(tmp_path / "m.json")])
    printed = capsys.readouterr().out
    metrics = json.loads((tmp_path / "m.json").read_text())

    labels = cifar100_arrays(NUM_TRAIN, NUM_TEST, num_classes=10)["test"][1]
    bias = head_bias.astype(np.float32).astype(np.float64)
    log_sum_exp = np.log(np.sum(np.exp(bias - bias.max()))) + bias.max()
    assert metrics["num_samples"] == NUM_TEST
    assert metrics["top1"] == pytest.approx(100.0 * np.mean(labels == 7))
    assert metrics["top5"] == pytest.approx(100.0 * np.mean(np.isin(labels, [7, 2, 9, 0, 4])))
    assert metrics["cross_entropy"] == pytest.approx(np.mean(log_sum_exp - bias[labels]), rel=1e-6)
    assert max(log_sum_exp - bias[labels]) > 64
    counts = np.bincount(labels, minlength=10)
    assert metrics["per_class_count"] == counts.tolist()
    assert metrics["per_class"] == [100.0 if label == 7 else 0.0 for label in range(10)]
    assert metrics["class_names"] == fine_label_names(10)
    # Every class but 7 scores 0 %: the worst are the five lowest class indices other than 7.
    assert [worst["name"] for worst in metrics["worst_classes"]] == fine_label_names(10)[:5]
    assert [worst["num_samples"] for worst in metrics["worst_classes"]] == counts[:5].tolist()
    assert metrics["split"] == "test" and metrics["config"] == str(run / "config.yaml")
    assert "top-1" in printed and fine_label_names(10)[4] in printed


def test_classes_without_test_images_have_no_accuracy(tmp_path, archive, capsys):
    run, _, _ = write_run(tmp_path, archive, "sparse", random_weights())
    metrics = evaluate_script.main(["--checkpoint", str(run / "best.pdparams")])
    labels = cifar100_arrays(NUM_TRAIN, NUM_TEST)["test"][1]
    absent = sorted(set(range(100)) - set(labels.tolist()))
    assert [metrics["per_class"][label] for label in absent] == [None] * len(absent)
    assert all(metrics["per_class"][label] in (0.0, 100.0) for label in labels)
    assert metrics["per_class_count"] == np.bincount(labels, minlength=100).tolist()


def test_run_config_is_found_from_a_checkpoint_folder_file_or_best_weights(tmp_path, archive10):
    run, _, _ = write_run(tmp_path, archive10, "found", fixed_class_weights(np.arange(10.0)), model={"num_classes": 10})
    step_folder = run / "checkpoints" / f"step_{CHECKPOINT_STEP}"
    for weights in (step_folder, step_folder / "model.pdparams", run / "best.pdparams"):
        assert checkpoint.run_config_path(str(weights)) == str(run / "config.yaml")
    metrics = evaluate_script.main(["--checkpoint", str(step_folder)])
    assert metrics["config"] == str(run / "config.yaml") and metrics["num_samples"] == NUM_TEST


def test_missing_run_config_and_npz_without_config_are_clear_errors(tmp_path, archive10, capsys):
    run, _, _ = write_run(tmp_path, archive10, "lost", fixed_class_weights(np.arange(10.0)), model={"num_classes": 10})
    (run / "config.yaml").unlink()
    code, message = run_eval(capsys, "--checkpoint", str(run / "best.pdparams"))
    assert code == 2 and "No --config given" in message and str(run / "best.pdparams") in message
    write_google_npz(tmp_path / "ViT-tiny.npz")
    code, message = run_eval(capsys, "--checkpoint", str(tmp_path / "ViT-tiny.npz"))
    assert code == 2 and "Google .npz" in message and "--config" in message
    code, message = run_eval(capsys, "--checkpoint", str(tmp_path / "nowhere.pdparams"))
    assert code == 2 and "does not exist" in message
    code, message = run_eval(capsys, "--checkpoint", "http://127.0.0.1:9/best.pdparams")
    assert code == 2 and "URL" in message and "--config" in message


def test_unreadable_weights_are_a_clear_error_also_through_the_run_folder(tmp_path, archive10, capsys):
    run, _, _ = write_run(
        tmp_path, archive10, "broken", fixed_class_weights(np.arange(10.0)), model={"num_classes": 10}
    )
    (run / "best.pdparams").write_bytes(b"not a pickle")
    code, message = run_eval(capsys, "--checkpoint", str(run / "best.pdparams"))
    assert code == 2 and str(run / "best.pdparams") in message and "Traceback" not in message
    code, message = run_eval(capsys, "--checkpoint", str(run))  # a folder's one .pdparams: the best weights
    assert code == 2 and f"'{run / 'best.pdparams'}' (--checkpoint) cannot be read" in message


def test_weights_of_another_shape_are_refused_naming_both_shapes(tmp_path, archive, archive10, capsys):
    ten, _, _ = write_run(tmp_path, archive10, "ten", random_weights(), model={"num_classes": 10})
    hundred, _, _ = write_run(tmp_path, archive, "hundred", random_weights())
    code, message = run_eval(
        capsys, "--checkpoint", str(ten / "best.pdparams"), "--config", str(hundred / "config.yaml")
    )
    assert code == 2
    width = TINY_MODEL["embed_dim"]
    assert f"head.weight (checkpoint [{width}, 10], model [{width}, 100])" in message
    assert "Traceback" not in message


def test_npz_is_evaluated_as_the_reference_model(tmp_path, archive):
    run, cfg, _ = write_run(tmp_path, archive, "google", random_weights())
    arrays = write_google_npz(tmp_path / "ViT-tiny.npz", num_classes=100)
    metrics = evaluate_script.main(
        ["--checkpoint", str(tmp_path / "ViT-tiny.npz"), "--config", str(run / "config.yaml")]
    )
    images = np.concatenate([batch.numpy() for batch, _ in data.build_eval_loader(cfg, "test", 0, 1)])
    labels = cifar100_arrays(NUM_TRAIN, NUM_TEST)["test"][1]
    logits = google_vit_forward(arrays, images)
    peak = logits.max(-1)
    losses = np.log(np.exp(logits - peak[:, None]).sum(-1)) + peak - logits[np.arange(NUM_TEST), labels]
    assert metrics["top1"] == pytest.approx(100.0 * np.mean(logits.argmax(-1) == labels))
    assert metrics["cross_entropy"] == pytest.approx(losses.mean(), rel=1e-4)


def test_npz_is_evaluated_strictly(tmp_path, archive, capsys):
    """A Google checkpoint with a 10-class head is not re-initialised to fit a 100-class model."""
    run, _, _ = write_run(tmp_path, archive, "google", random_weights())
    write_google_npz(tmp_path / "ViT-tiny.npz", num_classes=10)
    code, message = run_eval(
        capsys, "--checkpoint", str(tmp_path / "ViT-tiny.npz"), "--config", str(run / "config.yaml")
    )
    assert code == 2 and "10" in message and "100" in message and "head" in message


def test_npz_missing_many_keys_names_the_evaluated_file_and_a_few_keys(tmp_path, archive, capsys):
    run, _, _ = write_run(tmp_path, archive, "google", random_weights())  # the tiny model: 2 blocks
    complete = write_google_npz(tmp_path / "complete.npz", num_classes=100)
    shallow = write_google_npz(tmp_path / "ViT-shallow.npz", num_classes=100, depth=1)
    missing = sorted(set(complete) - set(shallow))
    code, message = run_eval(
        capsys, "--checkpoint", str(tmp_path / "ViT-shallow.npz"), "--config", str(run / "config.yaml")
    )
    assert code == 2 and str(tmp_path / "ViT-shallow.npz") in message and "--checkpoint" in message
    assert "model.pretrained" not in message
    shown = models.weights.KEYS_LISTED
    assert len(missing) > shown
    assert f"missing {', '.join(missing[:shown])} and {len(missing) - shown} more." in message
    assert message.count("\n") == 1  # one paragraph


def test_dropout_consistency_averages_over_images_and_passes(tmp_path, archive):
    _, _, model = write_run(tmp_path, archive, "kl", random_weights(), model={"dropout": 0.3})
    images = paddle.to_tensor(np.random.default_rng(3).standard_normal((6, 3, 16, 16)).astype(np.float32))
    labels = paddle.zeros([6], dtype="int64")
    samples = 4
    model.eval()
    reference = model(images).numpy()
    model.train()
    sampled = []
    for sample in range(samples):
        paddle.seed(seeding.paddle_seed(11, seeding.Purpose.CONSISTENCY_DROPOUT, 0, sample))
        sampled.append(model(images).numpy())
    model.eval()
    result = evaluation.dropout_consistency(model, [(images, labels)], samples, 11, Context(0, 1))
    kl = np.mean([symmetric_kl_rows(logits, reference) for logits in sampled])
    changed = np.mean([logits.argmax(-1) != reference.argmax(-1) for logits in sampled])
    assert kl > 0
    assert result["symmetric_kl"] == pytest.approx(kl, rel=1e-5)
    assert result["disagreement"] == pytest.approx(100.0 * changed)
    assert not model.training  # the mode is restored


def test_consistency_is_zero_without_dropout_and_positive_with_it(tmp_path, archive, capsys):
    run, _, _ = write_run(tmp_path, archive, "drop", random_weights())
    checkpoint = str(run / "best.pdparams")
    without = evaluate_script.main(["--checkpoint", checkpoint, "--consistency", "3", "-o", "model.dropout=0.0"])
    assert without["consistency"] == {"samples": 3, "symmetric_kl": 0.0, "disagreement": 0.0}
    with_dropout = evaluate_script.main(["--checkpoint", checkpoint, "--consistency", "3", "-o", "model.dropout=0.3"])
    assert with_dropout["consistency"]["symmetric_kl"] > 0
    assert with_dropout["consistency"]["disagreement"] > 0
    # The deterministic metrics do not depend on the dropout rate.
    assert with_dropout["top1"] == without["top1"] and with_dropout["cross_entropy"] == pytest.approx(
        without["cross_entropy"]
    )
    code, message = run_eval(capsys, "--checkpoint", checkpoint, "--consistency", "-1")
    assert code == 2 and "--consistency" in message


@pytest.mark.slow
@pytest.mark.parametrize("processes", [2, 3])
def test_every_image_is_counted_once_on_several_processes(tmp_path, archive, processes):
    run, _, _ = write_run(tmp_path, archive, "ranks", random_weights(), eval={"batch_size": 4})
    checkpoint = str(run / "best.pdparams")
    single = evaluate_script.main(["--checkpoint", checkpoint])
    result = launch(
        ["--checkpoint", checkpoint, "--output", str(tmp_path / "m.json")],
        tmp_path / "logs",
        processes=processes,
        script="eval.py",
    )
    logs = "".join(path.read_text() for path in (tmp_path / "logs").glob("workerlog.*"))
    assert result.returncode == 0, result.stdout + result.stderr + logs
    several = json.loads((tmp_path / "m.json").read_text())
    assert several["num_samples"] == single["num_samples"] == NUM_TEST
    assert several["per_class_count"] == single["per_class_count"]
    for key in ("top1", "top5", "per_class"):
        assert several[key] == single[key], key
    assert several["cross_entropy"] == pytest.approx(single["cross_entropy"], rel=1e-6)
    assert 0 < single["top5"] < 100  # generic predictions, not a degenerate all-or-nothing case


@pytest.mark.slow
def test_consistency_is_the_same_on_one_two_and_three_processes(tmp_path, archive):
    """Each image's dropout masks must not depend on which rank evaluates it."""
    run, _, _ = write_run(tmp_path, archive, "ranks", random_weights(), model={"dropout": 0.3}, eval={"batch_size": 4})
    arguments = ["--checkpoint", str(run / "best.pdparams"), "--consistency", "2"]
    results = []
    for processes in (1, 2, 3):
        output = tmp_path / f"m{processes}.json"
        result = launch(arguments + ["--output", str(output)], tmp_path / f"logs{processes}", processes, "eval.py")
        assert result.returncode == 0, result.stdout + result.stderr
        results.append(json.loads(output.read_text())["consistency"])
    assert results[0]["symmetric_kl"] > 0
    for several in results[1:]:
        assert several["symmetric_kl"] == pytest.approx(results[0]["symmetric_kl"], rel=1e-9)
        assert several["disagreement"] == pytest.approx(results[0]["disagreement"], rel=1e-9)


def test_output_is_checked_before_the_evaluation_and_never_left_half_written(tmp_path, archive10, capsys, monkeypatch):
    run, _, _ = write_run(tmp_path, archive10, "out", fixed_class_weights(np.arange(10.0)), model={"num_classes": 10})
    checkpoint = str(run / "best.pdparams")
    metrics_path = tmp_path / "metrics.json"
    evaluate_script.main(["--checkpoint", checkpoint, "--output", str(metrics_path)])
    assert f"Wrote the metrics to {metrics_path}" in capsys.readouterr().out
    previous = metrics_path.read_bytes()

    # A full disk while the JSON is written: the previous file stays whole, no partial file remains.
    def full_disk_dump(report, stream, **kwargs):
        stream.write('{"top1": ')
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate_script.atomic.json, "dump", full_disk_dump)
    code, message = run_eval(capsys, "--checkpoint", checkpoint, "--output", str(metrics_path))
    assert code == 2 and "No space left on device" in message and str(metrics_path) in message
    assert metrics_path.read_bytes() == previous and sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json",
        "out",
        "out.yaml",
    ]
    monkeypatch.undo()

    # An output that cannot be written fails before the evaluation, not after it.
    monkeypatch.setattr(evaluation, "evaluate", lambda *args, **kwargs: pytest.fail("evaluated first"))
    (tmp_path / "a_file").write_text("")
    for unwritable in (tmp_path / "a_file" / "metrics.json", tmp_path):
        code, message = run_eval(capsys, "--checkpoint", checkpoint, "--output", str(unwritable))
        assert code == 2 and f"--output '{unwritable}'" in message and "Traceback" not in message


@pytest.mark.parametrize("selected_by", ["test", "val", "checkpoint folder", "no best.json"])
def test_the_console_and_output_say_which_split_selected_the_weights(tmp_path, archive, capsys, selected_by):
    run, _, _ = write_run(tmp_path, archive, "run", random_weights())
    weights = run / checkpoint.BEST_WEIGHTS
    if selected_by in ("test", "val"):
        (run / checkpoint.BEST_METRICS).write_text(json.dumps({"step": 5, "split": selected_by, "top1": 1.0}))
    if selected_by == "checkpoint folder":
        weights = run / checkpoint.CHECKPOINTS / f"step_{CHECKPOINT_STEP}"
    evaluate_script.main(["--checkpoint", str(weights), "--output", str(tmp_path / "m.json")])
    (printed,) = [line.strip() for line in capsys.readouterr().out.splitlines() if line.strip().startswith("weights ")]
    written = json.loads((tmp_path / "m.json").read_text())
    assert written["split"] == "test"  # the evaluated split, whatever selected the weights
    if selected_by in ("test", "val"):
        assert written["selected_on"] == selected_by
        assert f"the best on the {selected_by} split during training (step 5, best.json)" in printed
        assert ("optimistic" in printed) == (selected_by == "test")
    elif selected_by == "checkpoint folder":
        assert written["selected_on"] is None
        assert f"the weights of training step {CHECKPOINT_STEP}, not selected on any split" in printed
    else:
        assert written["selected_on"] is None and "selection unknown" in printed
    assert printed == f"weights        {written['selection']}"
