"""Crop sampling and resampling: the host transforms, the device-side batch transform, and their
agreement with each other (also through the loaders), with Paddle's RandomResizedCrop and with plain
bilinear resize."""

import itertools
import math
import random

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from cifar_archive import write_cifar100_archive
from data_helpers import make_cfg
from paddle.vision.transforms import RandomResizedCrop

import data
from data.datasets import ImageSet
from data.loader import TrainSamples
from data.transforms import CropBox, resize_batch, resized_crop, resized_crop_batch, sample_crop_box, whole_image_box

DRAWS = 4000
# Two-sample Kolmogorov-Smirnov critical value at significance 0.001 for n = m = DRAWS:
# 1.95 * sqrt(2 / DRAWS) = 0.0436. Both samplers are seeded, so the test is deterministic; the
# bound is loose enough for two correct samplers and tight enough to catch the plausible mistakes
# (measured once while writing this test: a uniform instead of log-uniform aspect ratio gives
# KS 0.08 on the aspect, a uniform side instead of area 0.16 on the area, an exclusive upper
# bound on the crop position 0.05-0.06 on top/left).
KS_BOUND = 1.95 * math.sqrt(2 / DRAWS)


def ks_statistic(first, second):
    first, second = np.sort(first), np.sort(second)
    values = np.concatenate([first, second])
    first_cdf = np.searchsorted(first, values, side="right") / len(first)
    second_cdf = np.searchsorted(second, values, side="right") / len(second)
    return np.abs(first_cdf - second_cdf).max()


def crop_features(boxes):
    boxes = np.asarray(boxes, dtype=np.float64)
    top, left, height, width = boxes.T
    return {"area": height * width / 1024, "aspect": width / height, "top": top, "left": left}


def paddle_crop_boxes(count, scale, seed):
    """Boxes from Paddle's own RandomResizedCrop parameter draw (global numpy and random state)."""
    np.random.seed(seed)
    random.seed(seed)
    transform = RandomResizedCrop(224, scale=scale)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    return [transform._dynamic_get_param(image) for _ in range(count)]


@pytest.mark.parametrize("scale", [(0.05, 1.0), (0.5, 1.0)])
def test_crop_boxes_follow_paddles_random_resized_crop_distribution(scale):
    rng = np.random.default_rng(11)
    ours = crop_features([sample_crop_box(rng, 32, 32, scale) for _ in range(DRAWS)])
    reference = crop_features(paddle_crop_boxes(DRAWS, scale, seed=5))
    for name in ours:
        assert ks_statistic(ours[name], reference[name]) < KS_BOUND, name


def test_crop_falls_back_to_the_ratio_clamped_centre_like_paddle():
    """With scale (1, 1) no crop of ratio within [3/4, 4/3] fits a 10x40 or 40x10 image, so both
    samplers fall back to the centre crop clamped to the ratio range."""
    rng = np.random.default_rng(0)
    transform = RandomResizedCrop(224, scale=(1.0, 1.0))
    for height, width in ((10, 40), (40, 10)):
        expected = transform._dynamic_get_param(np.zeros((height, width, 3), dtype=np.uint8))
        assert sample_crop_box(rng, height, width, (1.0, 1.0)) == CropBox(*expected)


def reference_resized_crop(image, box, out_size):
    """Textbook bilinear sampling, one output pixel at a time: source pixel-centre coordinate
    start + (o + 0.5) * length / out_size - 0.5, clamped to the image, then normalised."""
    channels, height, width = image.shape
    pixels = image.astype(np.float64) / 127.5 - 1.0

    def taps(start, length, size, o):
        position = min(max(start + (o + 0.5) * length / out_size - 0.5, 0.0), size - 1)
        low = int(math.floor(position))
        return low, min(low + 1, size - 1), position - low

    out = np.zeros((channels, out_size, out_size))
    for y, x in itertools.product(range(out_size), repeat=2):
        y0, y1, wy = taps(box.top, box.height, height, y)
        x0, x1, wx = taps(box.left, box.width, width, x)
        top = pixels[:, y0, x0] * (1 - wx) + pixels[:, y0, x1] * wx
        bottom = pixels[:, y1, x0] * (1 - wx) + pixels[:, y1, x1] * wx
        out[:, y, x] = top * (1 - wy) + bottom * wy
    return out


BOXES = [CropBox(0, 0, 32, 32), CropBox(3, 5, 7, 20), CropBox(20, 1, 12, 9), CropBox(31, 31, 1, 1)]


@pytest.mark.parametrize("out_size", [9, 40])
def test_host_and_device_crops_match_the_reference_sampling(out_size):
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(len(BOXES), 3, 32, 32), dtype=np.uint8)
    expected = np.stack([reference_resized_crop(image, box, out_size) for image, box in zip(images, BOXES)])
    host = np.stack([resized_crop(image, box, out_size) for image, box in zip(images, BOXES)])
    device = resized_crop_batch(
        paddle.to_tensor(images), paddle.to_tensor(np.array(BOXES, dtype=np.float32)), out_size
    ).numpy()
    assert host.dtype == np.float32 and host.shape == expected.shape
    np.testing.assert_allclose(host, expected, atol=1e-5)
    np.testing.assert_allclose(device, expected, atol=1e-5)


@pytest.mark.parametrize("out_size", [16, 32, 75])
def test_whole_image_crop_is_plain_bilinear_resize(out_size):
    images = np.random.default_rng(3).integers(0, 256, size=(3, 3, 32, 32), dtype=np.uint8)
    expected = F.interpolate(
        paddle.to_tensor(images.astype(np.float32) / 127.5 - 1.0),
        size=[out_size, out_size],
        mode="bilinear",
        align_corners=False,
    ).numpy()
    device = resize_batch(paddle.to_tensor(images), out_size).numpy()
    host = np.stack([resized_crop(image, whole_image_box(32, 32), out_size) for image in images])
    np.testing.assert_allclose(device, expected, atol=1e-5)
    np.testing.assert_allclose(host, expected, atol=1e-5)


@pytest.fixture(scope="module")
def six_batch_archive(tmp_path_factory):
    """24 training images: 6 micro-batches of 4 per epoch; 10 test images."""
    path = tmp_path_factory.mktemp("cifar") / "cifar-100-python.tar.gz"
    return write_cifar100_archive(path, num_train=24, num_test=10, seed=4, num_classes=10)


def test_device_eval_path_equals_host_eval_path(six_batch_archive):
    host_cfg = make_cfg(six_batch_archive, img_size=56, eval_batch_size=4)
    device_cfg = make_cfg(six_batch_archive, img_size=56, eval_batch_size=4, device_augment=True)
    host = [(images.numpy(), labels.numpy()) for images, labels in data.build_eval_loader(host_cfg, "test", 0, 1)]
    device = [(images.numpy(), labels.numpy()) for images, labels in data.build_eval_loader(device_cfg, "test", 0, 1)]
    assert len(host) == len(device) == 3
    for (host_images, host_labels), (device_images, device_labels) in zip(host, device):
        np.testing.assert_array_equal(host_labels, device_labels)
        np.testing.assert_allclose(device_images, host_images, atol=1e-5)


def test_device_training_path_reproduces_the_host_crops(six_batch_archive):
    """Both paths draw each crop from the same per-sample generator, so switching
    data.device_augment changes where the work runs, not what the model sees."""
    host = data.TrainStream(make_cfg(six_batch_archive, img_size=48, micro_batch_size=4), 0, 1)
    device = data.TrainStream(make_cfg(six_batch_archive, img_size=48, micro_batch_size=4, device_augment=True), 0, 1)
    for _ in range(8):  # 6 micro-batches per epoch: crosses into epoch 1
        host_images, host_labels = next(host)
        device_images, device_labels = next(device)
        np.testing.assert_array_equal(host_labels.numpy(), device_labels.numpy())
        np.testing.assert_allclose(device_images.numpy(), host_images.numpy(), atol=1e-5)


def test_training_crops_vary_between_epochs_and_samples():
    """Reproducible must not mean constant: the same image gets new crops in a new epoch."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, size=(6, 3, 32, 32), dtype=np.uint8)
    settings = data.InputSettings.from_config(make_cfg(None, device_augment=True))
    samples = TrainSamples(ImageSet(images, np.zeros(6, np.int64), (), "random"), settings)
    for index in range(6):
        boxes = {tuple(samples[(epoch, index)][1]) for epoch in range(3)}
        assert len(boxes) > 1, index
    assert len({tuple(samples[(0, index)][1]) for index in range(6)}) > 1
