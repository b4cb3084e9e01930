"""Model weights: Google .npz against a NumPy ViT, .pdparams and checkpoint-folder round trips,
adaptations, strict fits, errors, URLs."""

import functools
import http.server
import logging
import os
import re
import threading

from rdrop import checkpoint
from rdrop.errors import UserError

import numpy as np
import paddle
import pytest
from vit_reference import google_vit_arrays, google_vit_forward, tiny_model_cfg, write_google_npz

import models
from models import weights


def images(batch=3, size=16, seed=1):
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def eval_logits(model, batch):
    model.eval()
    return model(paddle.to_tensor(batch)).numpy()


@pytest.fixture
def tiny_npz(tmp_path):
    path = tmp_path / "ViT-tiny.npz"
    return path, write_google_npz(path)


def test_google_npz_gives_the_reference_logits(tiny_npz):
    path, arrays = tiny_npz
    model = models.build_model(tiny_model_cfg(pretrained=str(path)))
    batch = images()
    np.testing.assert_allclose(eval_logits(model, batch), google_vit_forward(arrays, batch), atol=1e-4)


def test_pre_logits_are_ignored_and_logged(tmp_path, caplog):
    path = tmp_path / "with_pre_logits.npz"
    arrays = write_google_npz(path, pre_logits=True)
    with caplog.at_level(logging.INFO, logger="models.weights"):
        model = models.build_model(tiny_model_cfg(pretrained=str(path)))
    assert "pre_logits/kernel" in caplog.text
    reference = google_vit_forward({k: v for k, v in arrays.items() if not k.startswith("pre_logits")}, images())
    np.testing.assert_allclose(eval_logits(model, images()), reference, atol=1e-4)


def test_saved_pdparams_and_checkpoint_folder_keep_the_logits(tiny_npz, tmp_path):
    path, _ = tiny_npz
    model = models.build_model(tiny_model_cfg(pretrained=str(path)))
    expected = eval_logits(model, images())
    saved = tmp_path / "vit.pdparams"
    paddle.save(model.state_dict(), str(saved))
    checkpoint = tmp_path / "checkpoints" / "step_7"
    checkpoint.mkdir(parents=True)
    paddle.save(model.state_dict(), str(checkpoint / "model.pdparams"))

    for source in (saved, checkpoint):
        paddle.seed(99)  # a different random initialisation underneath
        reloaded = models.build_model(tiny_model_cfg(pretrained=str(source)))
        np.testing.assert_allclose(eval_logits(reloaded, images()), expected, atol=1e-6)


def test_paddleclas_style_numpy_state_dict_loads(tiny_npz, tmp_path):
    # PaddleClas distributes its weights as pickled dicts of NumPy arrays under the same names.
    path, arrays = tiny_npz
    state = {k: v.numpy() for k, v in models.build_model(tiny_model_cfg(pretrained=str(path))).state_dict().items()}
    numpy_pdparams = tmp_path / "ViT_tiny_pretrained.pdparams"
    paddle.save(state, str(numpy_pdparams))
    model = models.build_model(tiny_model_cfg(pretrained=str(numpy_pdparams)))
    np.testing.assert_allclose(eval_logits(model, images()), google_vit_forward(arrays, images()), atol=1e-4)


def test_head_with_other_classes_is_zeroed_and_logged(tiny_npz, caplog):
    path, arrays = tiny_npz
    with caplog.at_level(logging.INFO, logger="models.weights"):
        model = models.build_model(tiny_model_cfg(num_classes=21, pretrained=str(path)))
    assert "head has 10 classes, the model 21: head initialised to zeros" in caplog.text
    assert model.head.weight.shape == [32, 21] and not model.head.weight.numpy().any()
    assert not model.head.bias.numpy().any()
    np.testing.assert_array_equal(model.cls_token.numpy(), arrays["cls"])  # the body is still loaded
    np.testing.assert_array_equal(model.norm.weight.numpy(), arrays["Transformer/encoder_norm/scale"])


def test_without_adaptation_head_and_grid_mismatches_are_errors(tiny_npz):
    path, _ = tiny_npz
    for cfg, offending in (
        ({"num_classes": 21}, "head.weight (checkpoint [32, 10], model [32, 21])"),
        ({"img_size": 24}, "pos_embed (checkpoint [1, 17, 32], model [1, 37, 32])"),
    ):
        model = models.build_model(tiny_model_cfg(**cfg))
        with pytest.raises(UserError, match=re.escape(offending)):
            models.load_weights(model, str(path), "--checkpoint")


def numpy_bilinear_align_corners(grid, new_side):
    """Independent reference: each output cell interpolates the 4 input cells around i*(n-1)/(m-1)."""
    old_side = grid.shape[0]
    out = np.zeros((new_side, new_side, grid.shape[2]))
    for i in range(new_side):
        for j in range(new_side):
            y, x = i * (old_side - 1) / (new_side - 1), j * (old_side - 1) / (new_side - 1)
            y0, x0 = min(int(y), old_side - 2), min(int(x), old_side - 2)
            dy, dx = y - y0, x - x0
            out[i, j] = (
                (1 - dy) * (1 - dx) * grid[y0, x0]
                + (1 - dy) * dx * grid[y0, x0 + 1]
                + dy * (1 - dx) * grid[y0 + 1, x0]
                + dy * dx * grid[y0 + 1, x0 + 1]
            )
    return out


def test_position_embedding_grid_is_resized_bilinearly(tiny_npz, caplog):
    path, arrays = tiny_npz  # 16 px / 4 px patches: a 4x4 grid
    with caplog.at_level(logging.INFO, logger="models.weights"):
        model = models.build_model(tiny_model_cfg(img_size=24, pretrained=str(path)))
    assert "from 4x4 to 6x6" in caplog.text
    original = arrays["Transformer/posembed_input/pos_embedding"]
    loaded = model.pos_embed.numpy()
    assert loaded.shape == (1, 37, 32)
    np.testing.assert_array_equal(loaded[:, 0], original[:, 0])  # class token kept as it is
    expected = numpy_bilinear_align_corners(original[0, 1:].reshape(4, 4, 32).astype(np.float64), 6)
    np.testing.assert_allclose(loaded[0, 1:].reshape(6, 6, 32), expected, atol=1e-5)


def test_resize_matches_the_public_codes_scipy_zoom():
    ndimage = pytest.importorskip("scipy.ndimage")
    pos_embed = np.random.default_rng(0).standard_normal((1, 1 + 7 * 7, 5)).astype(np.float32)
    resized = models.resize_position_embedding(pos_embed, 12)
    zoomed = ndimage.zoom(pos_embed[0, 1:].reshape(7, 7, 5), (12 / 7, 12 / 7, 1), order=1)
    np.testing.assert_allclose(resized[0, 1:], zoomed.reshape(144, 5), atol=1e-5)


def test_resize_to_the_same_grid_is_the_identity():
    pos_embed = np.random.default_rng(0).standard_normal((1, 10, 4)).astype(np.float32)
    np.testing.assert_allclose(models.resize_position_embedding(pos_embed, 3), pos_embed, atol=1e-6)


# ---- errors: never a partial load -------------------------------------------------------------


def load_error(path, **cfg):
    with pytest.raises(UserError) as error:
        models.build_model(tiny_model_cfg(pretrained=str(path), **cfg))
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    return message


def test_missing_google_key_is_named(tmp_path):
    arrays = google_vit_arrays()
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
    write_google_npz(tmp_path / "missing.npz", arrays)
    message = load_error(tmp_path / "missing.npz")
    assert "missing Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias" in message


def test_unexpected_google_keys_are_named_the_first_few_and_a_count(tmp_path):
    arrays = write_google_npz(tmp_path / "deeper.npz", depth=3)  # one block more than the model
    unexpected = sorted(key for key in arrays if key.startswith("Transformer/encoderblock_2/"))
    message = load_error(tmp_path / "deeper.npz")
    shown = weights.KEYS_LISTED
    assert len(unexpected) > shown  # else nothing would be left out
    assert f"unexpected {', '.join(unexpected[:shown])} and {len(unexpected) - shown} more" in message
    assert unexpected[shown] not in message


def test_other_head_count_is_a_shape_error_with_both_shapes(tmp_path):
    write_google_npz(tmp_path / "two_heads.npz", num_heads=2)  # same width, 2 heads of 16 instead of 4 of 8
    message = load_error(tmp_path / "two_heads.npz")
    assert "MultiHeadDotProductAttention_1/query/kernel (checkpoint [32, 2, 16], model [32, 4, 8])" in message


def test_other_width_is_a_shape_error(tmp_path):
    write_google_npz(tmp_path / "wide.npz", embed_dim=48, num_heads=4)
    message = load_error(tmp_path / "wide.npz")
    # Nearly every array differs; the first in name order is listed with both shapes, the rest counted.
    assert "other shapes: Transformer/encoder_norm/bias (checkpoint [48], model [32])," in message
    assert re.search(r"and \d+ more\.", message)


def test_head_with_other_width_is_not_re_initialised(tmp_path):
    arrays = google_vit_arrays()
    arrays["head/kernel"] = np.zeros((16, 10), np.float32)
    write_google_npz(tmp_path / "odd_head.npz", arrays)
    message = load_error(tmp_path / "odd_head.npz")
    assert "head.weight (checkpoint [16, 10], model [32, 10])" in message


def test_pdparams_key_and_shape_errors(tiny_npz, tmp_path):
    path, _ = tiny_npz
    state = {k: v.numpy() for k, v in models.build_model(tiny_model_cfg(pretrained=str(path))).state_dict().items()}
    extra = dict(state, **{"blocks.2.norm1.weight": np.ones(32, np.float32)})
    paddle.save(extra, str(tmp_path / "extra.pdparams"))
    assert "unexpected blocks.2.norm1.weight" in load_error(tmp_path / "extra.pdparams")

    missing = {k: v for k, v in state.items() if k != "blocks.0.attn.qkv.bias"}
    paddle.save(missing, str(tmp_path / "missing.pdparams"))
    assert "missing blocks.0.attn.qkv.bias" in load_error(tmp_path / "missing.pdparams")

    wrong = dict(state, **{"blocks.1.mlp.fc1.weight": np.ones((32, 65), np.float32)})
    paddle.save(wrong, str(tmp_path / "wrong.pdparams"))
    assert "blocks.1.mlp.fc1.weight (checkpoint [32, 65], model [32, 64])" in load_error(tmp_path / "wrong.pdparams")


def test_strict_fit_lists_missing_unexpected_and_mismatched_keys_together(tmp_path):
    model = paddle.nn.Linear(4, 10)
    paddle.save({"weight": paddle.zeros([4, 100]), "extra": paddle.zeros([1])}, str(tmp_path / "bad.pdparams"))
    with pytest.raises(UserError) as error:
        models.load_weights(model, str(tmp_path / "bad.pdparams"), "train.resume")
    message = str(error.value)
    assert "missing bias" in message and "unexpected extra" in message
    assert "weight (checkpoint [4, 100], model [4, 10])" in message
    assert "train.resume" in message and "model.pretrained" not in message
    paddle.save({"weight": paddle.ones([4, 10]), "bias": paddle.ones([10])}, str(tmp_path / "good.pdparams"))
    models.load_weights(model, str(tmp_path / "good.pdparams"), "train.resume")
    np.testing.assert_array_equal(model.weight.numpy(), np.ones([4, 10]))


def test_corrupt_weights_in_a_checkpoint_folder_are_a_user_error(tmp_path):
    folder = checkpoint.save(
        str(tmp_path), 3, {"weight": paddle.ones([4, 10])}, {"velocity": paddle.ones([1])}, {}, keep=1
    )
    with open(os.path.join(folder, checkpoint.MODEL_FILE), "wb") as stream:
        stream.write(b"\x00garbage")
    with pytest.raises(UserError, match="model.pdparams' \\(train.resume\\) cannot be read"):
        models.load_weights(paddle.nn.Linear(4, 10), folder, "train.resume")


def test_pickled_object_array_is_refused_unopened(tmp_path):
    arrays = google_vit_arrays()
    arrays["cls"] = np.array([{"not": "weights"}], dtype=object)
    np.savez(tmp_path / "objects.npz", **arrays)  # numpy pickles object arrays when saving
    assert "never unpickled" in load_error(tmp_path / "objects.npz")


@pytest.mark.parametrize(
    "name, content",
    [
        ("random.npz", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))),
        ("text.npz", b"this is a text file, not weights\n"),
        ("random.pdparams", bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8))),
        ("text.pdparams", b"this is a text file, not weights\n"),
    ],
)
def test_file_that_is_no_checkpoint_is_a_user_error(tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    load_error(tmp_path / name)


def test_truncated_npz_is_a_user_error(tiny_npz, tmp_path):
    path, _ = tiny_npz
    data = path.read_bytes()
    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    load_error(tmp_path / "truncated.npz")


def test_single_array_npy_named_npz_is_a_user_error(tmp_path):
    with open(tmp_path / "single.npz", "wb") as handle:
        np.save(handle, np.zeros(3))
    assert "single array" in load_error(tmp_path / "single.npz")


def test_pdparams_without_a_state_dict_is_a_user_error(tmp_path):
    paddle.save([np.zeros(3)], str(tmp_path / "list.pdparams"))
    assert "state dict" in load_error(tmp_path / "list.pdparams")


def test_missing_path_folder_without_model_and_unknown_format(tmp_path):
    assert "do not exist" in load_error(tmp_path / "absent.npz")
    (tmp_path / "empty_checkpoint").mkdir()
    assert "holds no .pdparams file" in load_error(tmp_path / "empty_checkpoint")
    for name in ("a.pdparams", "b.pdparams"):
        paddle.save({"w": paddle.ones([1])}, str(tmp_path / "empty_checkpoint" / name))
    assert "holds 2 .pdparams files (a.pdparams, b.pdparams)" in load_error(tmp_path / "empty_checkpoint")
    (tmp_path / "weights.pth").write_bytes(b"\0")
    assert "unknown format" in load_error(tmp_path / "weights.pth")


# ---- URLs: downloaded once into Paddle's cache ------------------------------------------------


@pytest.fixture
def weights_server(tmp_path, monkeypatch):
    """A loopback HTTP server for tmp_path/served, counting GET requests; Paddle's cache in tmp_path."""
    served = tmp_path / "served"
    served.mkdir()
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(weights.download, "WEIGHTS_HOME", str(tmp_path / "cache"))
    yield f"http://127.0.0.1:{server.server_address[1]}", served, requests
    server.shutdown()
    server.server_close()


def test_url_is_downloaded_once_and_kept_as_npz(weights_server, tmp_path):
    base, served, requests = weights_server
    arrays = write_google_npz(served / "ViT-tiny.npz")
    url = f"{base}/ViT-tiny.npz"
    for _ in range(2):
        model = models.build_model(tiny_model_cfg(pretrained=url))
        np.testing.assert_allclose(eval_logits(model, images()), google_vit_forward(arrays, images()), atol=1e-4)
    strict = models.build_model(tiny_model_cfg())
    models.load_weights(strict, url, "--checkpoint")  # the same reader, strictly: from the cache
    np.testing.assert_allclose(eval_logits(strict, images()), google_vit_forward(arrays, images()), atol=1e-4)
    assert requests == ["/ViT-tiny.npz"]
    assert (tmp_path / "cache" / "ViT-tiny.npz").is_file()  # the archive itself, not unpacked


def test_md5_mismatch_and_missing_url_are_user_errors(weights_server):
    base, served, _ = weights_server
    write_google_npz(served / "ViT-tiny.npz")
    model = models.build_model(tiny_model_cfg())
    with pytest.raises(UserError, match="ViT-tiny.npz"):
        models.load_weights(model, f"{base}/ViT-tiny.npz", "model.pretrained", adapt=True, md5sum="0" * 32)
    with pytest.raises(UserError, match="absent.npz"):
        models.load_weights(model, f"{base}/absent.npz", "model.pretrained", adapt=True)
