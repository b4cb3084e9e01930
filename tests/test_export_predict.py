"""scripts/export.py and scripts/predict.py: the inference model reproduces the trained model, and
predict classifies image files as evaluation classifies the same pixels."""

import json

import numpy as np
import paddle
import pytest
from cifar_archive import cifar100_arrays, fine_label_names
from eval_helpers import random_weights, write_run
from PIL import Image
from run_helpers import load_script

import data
from data.host_samples import EvalSamples
from data.image_set import ImageSet
from data.settings import InputSettings

NUM_TRAIN, NUM_TEST = 48, 21


export = load_script("export")
predict = load_script("predict")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, archive):
    """A run with random weights, exported once: (run folder, cfg, dynamic model, export folder, result)."""
    tmp_path = tmp_path_factory.mktemp("export")
    run, cfg, model = write_run(tmp_path, archive, "run", random_weights())
    model.eval()
    output = tmp_path / "exported"
    result = export.main(["--checkpoint", str(run / "best.pdparams"), "--output", str(output)])
    return run, cfg, model, output, result


def softmax(logits):
    exp = np.exp(logits - logits.max(-1, keepdims=True))
    return exp / exp.sum(-1, keepdims=True)


def test_exported_model_reproduces_the_dynamic_model(exported):
    _, cfg, model, output, result = exported
    assert result["max_abs_difference"] <= export.TOLERANCE
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
    printed = capsys.readouterr().out
    # What evaluation feeds the model for these test images: the eval loader's batches.
    evaluated = next(iter(data.build_eval_loader(cfg, "test", 0, 1)))[0].numpy()[:4]
    for (path, ranked), preprocessed in zip(results, evaluated):
        names, probabilities = dynamic_top_classes(model, preprocessed)
        assert [name for name, _ in ranked] == names
        np.testing.assert_allclose([p for _, p in ranked], probabilities, rtol=0, atol=1e-5)
        assert f"1. {names[0]}" in printed and path in printed


def test_predict_resizes_other_sizes_and_jpeg_as_evaluation_would(exported, tmp_path):
    """A 40 x 24 RGBA PNG and a JPEG: compared on the pixels Pillow decodes, through the eval dataset."""
    _, cfg, model, output, _ = exported
    rng = np.random.default_rng(8)
    odd = rng.integers(0, 256, size=(24, 40, 4), dtype=np.uint8)
    Image.fromarray(odd, mode="RGBA").save(tmp_path / "odd.png")
    Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(tmp_path / "photo.jpg", quality=90)
    results = predict.predict(str(output), [str(tmp_path / "odd.png"), str(tmp_path / "photo.jpg")])
    settings = InputSettings.from_config(cfg)
    for path, ranked in results:
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
