"""scripts/export.py and scripts/predict.py: the inference model (Paddle and ONNX) reproduces the
trained model, a failed export leaves the previous one intact, and predict classifies image files and
folders as evaluation classifies the same pixels, reporting each bad file or broken export clearly."""

import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import weakref
import zlib

from rdrop import inference

import numpy as np
import onnxruntime
import paddle
import pytest
from cifar_archive import cifar100_arrays, fine_label_names
from eval_helpers import random_weights, write_run
from PIL import Image
from run_helpers import ROOT, load_script

import data
from data import transforms
from data.datasets import ImageSet
from data.loader import EvalSamples, InputSettings

NUM_TRAIN, NUM_TEST = 48, 21


export = load_script("export")
predict = load_script("predict")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, archive):
    """A run with random weights, exported once with ONNX: (run folder, cfg, dynamic model, export
    folder, result)."""
    tmp_path = tmp_path_factory.mktemp("export")
    run, cfg, model = write_run(tmp_path, archive, "run", random_weights())
    model.eval()
    output = tmp_path / "exported"
    result = export.main(["--checkpoint", str(run / "best.pdparams"), "--output", str(output), "--onnx"])
    return run, cfg, model, output, result


def softmax(logits):
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def test_exported_model_reproduces_the_dynamic_model(exported):
    _, cfg, model, output, result = exported
    assert set(result["max_abs_difference"]) == {"paddle", "onnx"}
    assert max(result["max_abs_difference"].values()) <= inference.TOLERANCE
    assert sorted(os.listdir(output.parent)) == ["exported", "run", "run.yaml"]  # no temporary folder left
    metadata = json.loads((output / "metadata.json").read_text())
    assert metadata["img_size"] == 16 and metadata["num_classes"] == 100
    assert metadata["class_names"] == fine_label_names(100)
    assert metadata["mean"] == [0.5] * 3 and metadata["std"] == [0.5] * 3
    assert (output / metadata["program_file"]).is_file() and (output / metadata["params_file"]).is_file()
    # Another batch size than the export's own check: the batch dimension is dynamic.
    batch = paddle.to_tensor(np.random.default_rng(5).standard_normal((5, 3, 16, 16)).astype(np.float32))
    reloaded = paddle.jit.load(str(output / "inference"))
    reloaded.eval()
    with paddle.no_grad():
        np.testing.assert_allclose(reloaded(batch).numpy(), model(batch).numpy(), rtol=0, atol=1e-5)


def test_onnx_export_runs_in_onnxruntime_with_any_batch_size(exported):
    _, _, model, output, _ = exported
    metadata = json.loads((output / "metadata.json").read_text())
    session = onnxruntime.InferenceSession(str(output / metadata["onnx_file"]), providers=["CPUExecutionProvider"])
    for size in (1, 7):
        batch = np.random.default_rng(size).standard_normal((size, 3, 16, 16)).astype(np.float32)
        (logits,) = session.run(None, {"images": batch})
        with paddle.no_grad():
            np.testing.assert_allclose(logits, model(paddle.to_tensor(batch)).numpy(), rtol=0, atol=1e-5)


def dynamic_top_classes(model, preprocessed, k=5):
    """(names, probabilities) of the dynamic model's top k for one float32 3 x S x S image."""
    with paddle.no_grad():
        probabilities = softmax(model(paddle.to_tensor(preprocessed[None])).numpy()[0].astype(np.float64))
    best = np.argsort(-probabilities)[:k]
    return [fine_label_names(100)[i] for i in best], probabilities[best]


def test_predict_on_png_files_matches_evaluation(exported, tmp_path, capsys):
    _, cfg, model, output, _ = exported
    images = cifar100_arrays(NUM_TRAIN, NUM_TEST)["test"][0][:4]
    paths = []
    for index, image in enumerate(images):
        paths.append(str(tmp_path / f"test_{index}.png"))
        Image.fromarray(image.transpose(1, 2, 0)).save(paths[-1])
    results = predict.main(["--model", str(output), *paths])
    printed = capsys.readouterr().out.splitlines()
    # What evaluation feeds the model for these test images: the eval loader's batches.
    evaluated = next(iter(data.build_eval_loader(cfg, "test", 0, 1)))[0].numpy()[:4]
    assert len(printed) == len(results) == 4
    for (path, ranked, error), preprocessed, line in zip(results, evaluated, printed):
        names, probabilities = dynamic_top_classes(model, preprocessed)
        assert error is None and [name for name, _ in ranked] == names
        np.testing.assert_allclose([p for _, p in ranked], probabilities, rtol=0, atol=1e-5)
        assert line.startswith(f"{path}: {names[0]} {100 * probabilities[0]:.2f} %, {names[1]} ")


def test_predict_through_onnxruntime_ranks_as_the_paddle_model(exported, tmp_path):
    output = exported[3]
    images = [str(save_png(tmp_path / f"{index}.png", index)) for index in range(3)]
    through_paddle = list(predict.predict(str(output), images, top=5))
    through_onnx = list(predict.predict(str(output), images, top=5, runtime_name="onnx"))
    for (path, paddle_ranked, _), (onnx_path, onnx_ranked, error) in zip(through_paddle, through_onnx):
        assert onnx_path == path and error is None
        assert [name for name, _ in onnx_ranked] == [name for name, _ in paddle_ranked]
        np.testing.assert_allclose([p for _, p in onnx_ranked], [p for _, p in paddle_ranked], rtol=0, atol=1e-5)


def test_onnx_predict_of_an_export_without_onnx_says_how_to_export_it(exported, tmp_path, capsys):
    without_onnx = tmp_path / "exported"
    shutil.copytree(exported[3], without_onnx)
    os.remove(without_onnx / inference.ONNX_FILE)
    code, _, err = run_script(predict, capsys, "--model", without_onnx, "--runtime", "onnx", tmp_path)
    assert code == 2 and "model.onnx is missing (export.py writes it with --onnx)" in err


def test_predict_resizes_other_sizes_and_jpeg_as_evaluation_would(exported, tmp_path):
    """A 40 x 24 RGBA PNG and a JPEG: compared on the pixels Pillow decodes, through the eval dataset."""
    _, cfg, model, output, _ = exported
    rng = np.random.default_rng(8)
    odd = rng.integers(0, 256, size=(24, 40, 4), dtype=np.uint8)
    Image.fromarray(odd, mode="RGBA").save(tmp_path / "odd.png")
    Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg", quality=90)
    results = list(predict.predict(str(output), [str(tmp_path / "odd.png"), str(tmp_path / "photo.jpg")]))
    settings = InputSettings.from_config(cfg)
    for path, ranked, _ in results:
        decoded = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
        samples = EvalSamples(ImageSet(decoded[None], np.zeros(1, np.int64), (), path), settings)
        names, probabilities = dynamic_top_classes(model, samples[0][0])
        assert [name for name, _ in ranked] == names
        np.testing.assert_allclose([p for _, p in ranked], probabilities, rtol=0, atol=1e-5)


def test_predict_errors_are_clear(exported, tmp_path, capsys):
    _, _, _, output, _ = exported
    (tmp_path / "notes.png").write_text("not an image")
    for args, expected in (
        (["--model", str(tmp_path), str(tmp_path / "notes.png")], "metadata.json"),
        (["--model", str(output), str(tmp_path / "notes.png")], "notes.png"),
        (["--model", str(output), str(tmp_path / "missing.png")], "missing.png"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            predict.main(args)
        message = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in message and "Traceback" not in message


def test_export_refuses_weights_that_do_not_fit(exported, tmp_path, capsys):
    run, _, _, _, _ = exported
    with pytest.raises(SystemExit) as exit_info:
        export.main(
            [
                "--checkpoint",
                str(run / "best.pdparams"),
                "--output",
                str(tmp_path / "out"),
                "-o",
                "model.num_classes=10",
            ]
        )
    assert exit_info.value.code == 2 and "head.weight" in capsys.readouterr().err


def run_script(script, capsys, *args):
    """script.main(args) expected to fail: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def save_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(20, 20, 3), dtype=np.uint8)).save(path)
    return path


def decompression_bomb(path, side=20_000):
    """A 1-bit grey PNG of side x side pixels (past Pillow's limit) that compresses to about 50 kB."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = (b"\x00" * (1 + side // 8)) * side  # each row: filter byte 0, then all-black pixels
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b"")
    )
    return path


def test_predict_classifies_folders_reports_each_bad_file_and_writes_json_and_csv(exported, tmp_path, capsys):
    _, _, model, output, _ = exported
    good = [save_png(tmp_path / "images" / "b.png", 1), save_png(tmp_path / "images" / "sub" / "a.png", 2)]
    (tmp_path / "images" / "notes.png").write_text("not an image")
    (tmp_path / "images" / "readme.txt").write_text("not an image, and not named like one: skipped")
    bomb = decompression_bomb(tmp_path / "bomb.png")
    arguments = [tmp_path / "images", bomb, tmp_path / "missing.jpg", tmp_path / "empty"]
    (tmp_path / "empty").mkdir()
    expected_files = [str(good[0]), str(tmp_path / "images" / "notes.png"), str(good[1])] + [
        str(path) for path in arguments[1:]
    ]
    outcomes = {}
    for name in ("results.json", "results.csv"):
        code, out, err = run_script(
            predict, capsys, "--model", output, "--top", 3, "--output", tmp_path / name, *arguments
        )
        assert code == 2 and "Traceback" not in err
        assert "error: 4 of 6 file(s) could not be classified" in err
        outcomes[name] = out
    for path in expected_files[1:2] + expected_files[3:]:
        assert f"error: {path}: " in err
    assert "decompression bomb" in err
    lines = outcomes["results.json"].splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(path) for path in good]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [row["file"] for row in rows] == expected_files
    with open(tmp_path / "results.csv", newline="") as stream:
        table = list(csv.reader(stream))
    assert table[0] == [
        "file",
        "error",
        "class_1",
        "probability_1",
        "class_2",
        "probability_2",
        "class_3",
        "probability_3",
    ]
    assert [row[0] for row in table[1:]] == expected_files
    for path in good:
        pixels = np.asarray(Image.open(path).convert("RGB")).transpose(2, 0, 1)
        preprocessed = transforms.resized_crop(pixels, transforms.whole_image_box(20, 20), 16)
        names, probabilities = dynamic_top_classes(model, preprocessed, k=3)
        row = next(row for row in rows if row["file"] == str(path))
        assert row["error"] is None and [p["class"] for p in row["predictions"]] == names
        np.testing.assert_allclose([p["probability"] for p in row["predictions"]], probabilities, atol=1e-5)
        csv_row = next(row for row in table if row[0] == str(path))
        assert csv_row[1] == "" and csv_row[2::2] == names
    for row in rows:
        if row["file"] not in map(str, good):
            assert row["error"] and row["predictions"] == []


@pytest.mark.parametrize("damage", ["truncated_weights", "img_size_zero", "no_class_names", "class_count"])
def test_predict_refuses_a_damaged_export_in_one_paragraph(exported, tmp_path, capsys, damage):
    _, _, _, output, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(output, broken)
    metadata = json.loads((broken / "metadata.json").read_text())
    if damage == "truncated_weights":  # what a full disk left before exports became atomic
        params = broken / metadata["params_file"]
        params.write_bytes(params.read_bytes()[: params.stat().st_size // 2])
    elif damage == "img_size_zero":
        metadata["img_size"] = 0
    elif damage == "no_class_names":
        metadata["class_names"] = []
    else:
        metadata["class_names"] = metadata["class_names"][:10]
    (broken / "metadata.json").write_text(json.dumps(metadata))
    code, out, err = run_script(predict, capsys, "--model", broken, save_png(tmp_path / "x.png", 0))
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.startswith(f"error: '{broken}' does not hold a usable model") and err.strip().count("\n") == 0
    expected = {
        "truncated_weights": "inference.pdiparams is not the file this export wrote",
        "img_size_zero": "img_size",
        "no_class_names": "class_names",
        "class_count": "100 outputs but metadata.json names 10 classes",
    }
    assert expected[damage] in err


def checkpoint_of(exported):
    return str(exported[0] / "best.pdparams")


def folder_contents(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("failure", ["silently_truncated", "disk_full", "onnx_disk_full"])
def test_a_failed_export_leaves_the_previous_export_intact(exported, tmp_path, capsys, monkeypatch, failure):
    previous = tmp_path / "exported"
    shutil.copytree(exported[3], previous)
    before = folder_contents(previous)
    real_save = paddle.jit.save

    def failing_save(layer, prefix, *args, **kwargs):
        real_save(layer, prefix, *args, **kwargs)
        params = prefix + ".pdiparams"
        if failure == "silently_truncated":  # what paddle.jit.save does on a full disk: no error, a short file
            with open(params, "r+b") as stream:
                stream.truncate(os.path.getsize(params) // 3)
        elif failure == "disk_full":
            raise OSError(28, "No space left on device")

    def failing_onnx_write(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(paddle.jit, "save", failing_save)
    if failure == "onnx_disk_full":
        monkeypatch.setattr(inference, "write_onnx", failing_onnx_write)
    code, _, err = run_script(export, capsys, "--checkpoint", checkpoint_of(exported), "--output", previous, "--onnx")
    assert code == 2 and "Traceback" not in err and err.strip().count("\n") == 0
    assert ("cannot be read back" if failure == "silently_truncated" else "No space left on device") in err
    assert folder_contents(previous) == before
    assert sorted(os.listdir(tmp_path)) == ["exported"]  # the temporary folder is gone too
    results = list(predict.predict(str(previous), [str(save_png(tmp_path / "images" / "x.png", 3))]))
    assert results[0][2] is None


def test_export_refuses_an_unwritable_output_before_any_work(exported, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("")
    code, _, err = run_script(export, capsys, "--checkpoint", checkpoint_of(exported), "--output", tmp_path / "file")
    assert code == 2 and "Cannot write the --output folder" in err and "Traceback" not in err
    # A read-only existing folder: root (as CI runs) may write anyway, so the permission check is
    # given the answer the operating system gives any other user.
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda path, mode: False if str(path) == str(read_only) else real_access(path, mode)
    )
    monkeypatch.setattr(export.models, "build_model", lambda *args: pytest.fail("export built a model first"))
    code, _, err = run_script(export, capsys, "--checkpoint", checkpoint_of(exported), "--output", read_only)
    assert code == 2 and "Permission denied" in err and "Traceback" not in err
    assert os.listdir(read_only) == []


def tree_contents(folder):
    """Every file under `folder`: {path relative to it: bytes}."""
    return {
        os.path.relpath(os.path.join(parent, name), folder): open(os.path.join(parent, name), "rb").read()
        for parent, _, names in os.walk(folder)
        for name in names
    }


def damage_metadata(folder, kind):
    path = folder / inference.METADATA_FILE
    if kind == "foreign_metadata":
        path.write_text(json.dumps({"experiment": "mine", "params_file": "weights.bin", "img_size": 16}))
    else:
        path.write_bytes(path.read_bytes()[:20])


@pytest.mark.parametrize(
    "other, named",
    [
        ("run_folder", "best.pdparams, checkpoints, config.yaml, notes.txt"),
        ("export_with_notes", "notes.txt"),
        ("foreign_metadata", "metadata.json is not an export's"),
        ("broken_metadata", "metadata.json cannot be read"),
    ],
)
def test_export_replaces_no_folder_but_an_earlier_export(exported, tmp_path, capsys, monkeypatch, other, named):
    target = tmp_path / "target"
    shutil.copytree(exported[0] if other == "run_folder" else exported[3], target)
    if other in ("run_folder", "export_with_notes"):
        (target / "notes.txt").write_text("what I tried, and why\n")
    else:
        damage_metadata(target, other)
    before = tree_contents(target)
    monkeypatch.setattr(export.models, "build_model", lambda *args: pytest.fail("export built a model first"))
    code, _, err = run_script(export, capsys, "--checkpoint", checkpoint_of(exported), "--output", target)
    assert code == 2 and err.strip().count("\n") == 0 and "Traceback" not in err
    assert f"'{target}' is not an earlier export" in err and named in err
    assert tree_contents(target) == before and sorted(os.listdir(tmp_path)) == ["target"]


def test_export_refuses_an_output_folder_it_cannot_list(exported, tmp_path, capsys, monkeypatch):
    """Root (as CI runs) lists any folder, so listing is given the answer other users get."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "notes.txt").write_text("what I tried, and why\n")
    real_listdir = os.listdir

    def listdir(path="."):
        if str(path) == str(target):
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    code, _, err = run_script(export, capsys, "--checkpoint", checkpoint_of(exported), "--output", target)
    assert code == 2 and "Traceback" not in err and "its files cannot be listed (Permission denied)" in err
    assert (target / "notes.txt").read_text() == "what I tried, and why\n"


def test_export_replaces_an_earlier_export(exported, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(exported[3], target)  # exported with --onnx
    export.main(["--checkpoint", checkpoint_of(exported), "--output", str(target)])
    assert sorted(os.listdir(target)) == ["inference.json", "inference.pdiparams", "metadata.json"]
    assert json.loads((target / "metadata.json").read_text())["onnx_file"] is None


def test_onnx_export_without_its_packages_says_what_to_install(exported, tmp_path, capsys, monkeypatch):
    real_import = inference.importlib.import_module

    def without_paddle2onnx(name, *args):
        if name == "paddle2onnx":
            raise ModuleNotFoundError("No module named 'paddle2onnx'")
        return real_import(name, *args)

    monkeypatch.setattr(inference.importlib, "import_module", without_paddle2onnx)
    code, _, err = run_script(
        export, capsys, "--checkpoint", checkpoint_of(exported), "--output", tmp_path / "o", "--onnx"
    )
    assert code == 2 and "requirements/export.txt" in err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_readme_commands_export_and_predict_a_folder(exported, tmp_path):
    """`export.py ... --onnx` and `predict.py --model ... FOLDER --output FILE` as the README writes them."""
    run, _, _, _, _ = exported
    output = tmp_path / "exported"
    export_command = [
        "scripts/export.py",
        "--checkpoint",
        str(run / "best.pdparams"),
        "--output",
        str(output),
        "--onnx",
    ]
    finished = subprocess.run([sys.executable, *export_command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert sorted(os.listdir(output)) == ["inference.json", "inference.pdiparams", "metadata.json", "model.onnx"]
    images = [save_png(tmp_path / "photos" / f"{index}.png", index) for index in range(3)]
    predict_command = ["scripts/predict.py", "--model", str(output), str(tmp_path / "photos")]
    predict_command += ["--output", str(tmp_path / "predictions.json")]
    finished = subprocess.run([sys.executable, *predict_command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert [line.split(": ")[0] for line in finished.stdout.splitlines()] == [str(path) for path in images]
    rows = json.loads((tmp_path / "predictions.json").read_text())
    in_process = list(predict.predict(str(output), [str(path) for path in images]))
    assert [[p["class"] for p in row["predictions"]] for row in rows] == [
        [name for name, _ in ranked] for _, ranked, _ in in_process
    ]


def test_predict_refuses_a_fifo_named_like_an_image_without_blocking(exported, tmp_path):
    folder = tmp_path / "images"
    good = save_png(folder / "a.png", 0)
    os.mkfifo(folder / "b.png")  # no writer ever opens it: reading it would wait forever
    result = subprocess.run(
        [sys.executable, "scripts/predict.py", "--model", str(exported[3]), str(folder)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {folder / 'b.png'}: not a regular file" in result.stderr
    assert result.stdout.startswith(f"{good}: ")


def test_predict_holds_one_batch_of_images_however_many_files(exported, tmp_path, monkeypatch):
    """Every preprocessed image is tracked by a weak reference; when the model runs, only the images
    of the batch it classifies may still exist."""
    paths = [str(save_png(tmp_path / f"{index:03d}.png", index)) for index in range(2 * predict.BATCH_SIZE + 5)]
    alive, batch_sizes, peak = [], [], []
    real_preprocess, real_load_model = predict.preprocess, predict.load_model

    def tracked_preprocess(*args):
        pixels = real_preprocess(*args)
        alive.append(weakref.ref(pixels))
        return pixels

    def counting_load_model(*args):
        model, *rest = real_load_model(*args)

        def run(batch):
            batch_sizes.append(len(batch))
            peak.append(sum(ref() is not None for ref in alive))
            return model(batch)

        return (run, *rest)

    monkeypatch.setattr(predict, "preprocess", tracked_preprocess)
    monkeypatch.setattr(predict, "load_model", counting_load_model)
    results = list(predict.predict(str(exported[3]), paths))
    assert [path for path, _, _ in results] == paths and all(error is None for _, _, error in results)
    assert batch_sizes == [predict.BATCH_SIZE, predict.BATCH_SIZE, 5]
    assert max(peak) <= predict.BATCH_SIZE


def test_predict_refuses_images_between_once_and_twice_pillows_limit(exported, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)  # 20 x 20 = 400 pixels: Pillow only warns
    path = save_png(tmp_path / "large.png", 0)
    code, out, err = run_script(predict, capsys, "--model", exported[3], path)
    assert code == 2 and out == ""
    assert f"error: {path}: refused: Image size (400 pixels) exceeds limit of 300 pixels" in err


def test_predict_refuses_weights_swapped_in_from_another_model(exported, archive, tmp_path, capsys):
    run, _, _ = write_run(tmp_path, archive, "other", random_weights(seed=1))
    other = tmp_path / "other_export"
    export.main(["--checkpoint", str(run / "best.pdparams"), "--output", str(other)])
    capsys.readouterr()
    swapped = tmp_path / "swapped"
    shutil.copytree(exported[3], swapped)
    shutil.copy(other / inference.PARAMS_FILE, swapped / inference.PARAMS_FILE)
    code, out, err = run_script(predict, capsys, "--model", swapped, save_png(tmp_path / "x.png", 0))
    assert code == 2 and out == "" and err.strip().count("\n") == 0
    assert "inference.pdiparams is not the file this export wrote" in err and "params_sha256" in err
