"""The image transforms of the R-Drop ViT recipe, on the host (one uint8 CHW image at a time, in the
loader workers) and on the device (a whole uint8 NCHW batch, `data.device_augment: true`).

Train: random resized crop (area fraction in `data.crop_scale`, aspect ratio log-uniform in
[3/4, 4/3], torchvision/Paddle algorithm), bilinear resize to `model.img_size`, no flip; eval: the
whole image resized the same way. Both then map [0, 255] to [-1, 1] (mean 0.5, std 0.5 on [0, 1]).

The crop box is always drawn on the host by `sample_crop_box`, from the same per-sample generator on
both paths, so the two paths see the same crops for the same seed; the device path only ships the
uint8 image and its box, and resamples the whole batch at once with `grid_sample`.

Resampling geometry (the same on both paths; tests pin the two together): output pixel o of a crop
[start, start + length) along an axis of `in_size` pixels samples the source at pixel-centre
coordinate start + (o + 0.5) * length / out_size - 0.5, clamped to [0, in_size - 1], with linear
interpolation. For a whole-image box this is plain bilinear resize with half-pixel centres
(`align_corners=False`). Unlike PIL, which crops first, a crop's edge samples may blend in up to
half a pixel of the neighbouring image content; there is no anti-aliasing when shrinking (the
recipe only enlarges 32x32 images). Image files of any size (`folder`, `filelist`) take their own
path, with Pillow: see the image-files section below.
"""

import math
from typing import NamedTuple

import numpy as np
import paddle
import paddle.nn.functional as F
from PIL import Image, ImageOps

MEAN = 0.5
STD = 0.5
RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10


class CropBox(NamedTuple):
    top: int
    left: int
    height: int
    width: int


def whole_image_box(height, width):
    return CropBox(0, 0, height, width)


def sample_crop_box(rng, height, width, scale, ratio=RATIO_RANGE, attempts=CROP_ATTEMPTS):
    """A random crop box, drawn from the same distribution as torchvision's / Paddle's
    RandomResizedCrop: up to `attempts` tries of an area uniform in scale * image area and a
    log-uniform aspect ratio (width / height), accepting the first that fits; else a centre crop
    of the whole image clamped to the ratio range."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = rng.uniform(scale[0], scale[1]) * area
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return CropBox(top, left, crop_height, crop_width)
    image_ratio = width / height
    if image_ratio < ratio[0]:
        crop_width, crop_height = width, int(round(width / ratio[0]))
    elif image_ratio > ratio[1]:
        crop_width, crop_height = int(round(height * ratio[1])), height
    else:
        crop_width, crop_height = width, height
    return CropBox((height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width)


def sampling_taps(start, length, in_size, out_size):
    """Per output pixel along one axis: the two source pixels to blend and the upper one's weight
    (see the module doc for the geometry)."""
    source = start + (np.arange(out_size) + 0.5) * (length / out_size) - 0.5
    source = np.clip(source, 0.0, in_size - 1)
    lower = np.floor(source).astype(np.intp)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, (source - lower).astype(np.float32)


def normalize(pixels):
    """uint8 (or float 0..255) -> float32 in [-1, 1]."""
    return (pixels.astype(np.float32) / 255.0 - MEAN) / STD


def resized_crop(image, box, out_size):
    """uint8 CHW image -> float32 CHW normalised crop `box` resized to out_size x out_size."""
    _, height, width = image.shape
    row_low, row_high, row_weight = sampling_taps(box.top, box.height, height, out_size)
    col_low, col_high, col_weight = sampling_taps(box.left, box.width, width, out_size)
    # Bilinear sampling of an axis-aligned box is separable. Gathers instead of interpolation
    # matrices: small multithreaded BLAS calls in many loader workers oversubscribe the cores (5x
    # slower than one thread here). Columns first, on the small image, so the full-size step
    # gathers whole contiguous rows; in place, because this step dominates the cost.
    pixels = normalize(image)
    low = pixels[:, :, col_low]
    columns = low + (pixels[:, :, col_high] - low) * col_weight
    out = columns[:, row_low, :]
    blend = columns[:, row_high, :]
    blend -= out
    blend *= row_weight[:, None]
    out += blend
    return out


# --- image files (`folder`, `filelist`, predict.py): open -> decode -> RGB -> crop/resize -> normalised ---
# Every image file goes through `load_rgb`: EXIF orientation applied (as PaddleClas's OpenCV decode
# does), then RGB. Pillow's own conversion serves every mode but 16-bit greyscale, which it clips to
# white: I;16 and I images are scaled from 0..65535 to 0..255 instead. Alpha (LA, RGBA, PA) is
# dropped, not composited, as torchvision's loader does; palette images take their palette colours;
# CMYK uses Pillow's plain conversion. Images of any size shrink as well as enlarge, so these resize
# with Pillow's antialiased bilinear filter to uint8 (torchvision's and Paddle's PIL transforms, as
# the public code's ImageNet pipeline), not with `resized_crop`, which the device path mirrors.

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_BIT_MAX = 65535


def load_rgb(path):
    """The file's first frame as an RGB Pillow image (raises what Pillow raises on a broken file)."""
    with Image.open(path) as image:
        image.load()
        # In place: otherwise Pillow copies every image without an orientation tag, 6-10% of the cost
        # of a training sample (docs/performance.md, image files).
        ImageOps.exif_transpose(image, in_place=True)
        return to_rgb(image)


def to_rgb(image):
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        grey = np.rint(np.clip(values, 0, SIXTEEN_BIT_MAX) * (255.0 / SIXTEEN_BIT_MAX)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def file_train_pixels(path, rng, img_size, crop_scale):
    """Training: float32 3 x img_size x img_size, a RandomResizedCrop of the file (box from
    `sample_crop_box`, cropped then resized as torchvision's resized_crop), normalised."""
    image = load_rgb(path)
    box = sample_crop_box(rng, image.height, image.width, crop_scale)
    crop = image.crop((box.left, box.top, box.left + box.width, box.top + box.height))
    return _normalised_chw(crop.resize((img_size, img_size), Image.Resampling.BILINEAR))


def file_eval_pixels(path, img_size):
    """Evaluation and predict: float32 3 x img_size x img_size, the whole file resized to a square
    (the public code's `Resize((S, S))`), normalised."""
    return _normalised_chw(load_rgb(path).resize((img_size, img_size), Image.Resampling.BILINEAR))


# How the evaluation of a dataset resizes, as export.py records it for predict.py.
ARRAY_RESIZE = "whole image, bilinear with half-pixel centres (data.transforms.resized_crop)"
FILE_RESIZE = "whole image, Pillow's antialiased bilinear to uint8 (data.transforms.file_eval_pixels)"
FILE_DATASETS = ("folder", "filelist")


def eval_resize(dataset):
    return FILE_RESIZE if dataset in FILE_DATASETS else ARRAY_RESIZE


def prepared_for_prediction(path, img_size, resize):
    """An image file prepared as the evaluation of the model's dataset prepares its test images."""
    if resize == FILE_RESIZE:
        return file_eval_pixels(path, img_size)
    pixels = np.asarray(load_rgb(path), dtype=np.uint8).transpose(2, 0, 1)
    return resized_crop(pixels, whole_image_box(*pixels.shape[1:]), img_size)


def _normalised_chw(image):
    return normalize(np.asarray(image, dtype=np.uint8)).transpose(2, 0, 1)


# --- the device path: whole batches, on whatever device they live on ---------------------------------


def normalize_batch(pixels):
    """uint8 tensor -> float32 in [-1, 1] (the mapping of `normalize`)."""
    return (pixels.astype("float32") / 255.0 - MEAN) / STD


def resized_crop_batch(pixels, boxes, out_size):
    """uint8 N x C x H x W pixels and N x 4 boxes -> float32 N x C x out_size x out_size, normalised:
    `resized_crop` of every image, up to rounding."""
    batch, channels, height, width = pixels.shape
    boxes = boxes.astype("float32")
    top, left, crop_height, crop_width = paddle.unbind(boxes, axis=1)
    # affine_grid maps output coordinates u in [-1, 1] to input coordinates scale * u + shift,
    # both normalised so that -1 and 1 are the outer edges of the image (align_corners=False);
    # border padding is the clamp of the host path.
    scale_x = crop_width / width
    shift_x = (2.0 * left + crop_width) / width - 1.0
    scale_y = crop_height / height
    shift_y = (2.0 * top + crop_height) / height - 1.0
    zeros = paddle.zeros_like(scale_x)
    theta = paddle.stack(
        [
            paddle.stack([scale_x, zeros, shift_x], axis=1),
            paddle.stack([zeros, scale_y, shift_y], axis=1),
        ],
        axis=1,
    )
    grid = F.affine_grid(theta, [batch, channels, out_size, out_size], align_corners=False)
    return F.grid_sample(normalize_batch(pixels), grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_batch(pixels, out_size):
    """The eval transform: whole images resized to out_size x out_size and normalised."""
    batch, _, height, width = pixels.shape
    whole = paddle.to_tensor([[0.0, 0.0, height, width]], dtype="float32", place=pixels.place)
    return resized_crop_batch(pixels, whole.expand([batch, 4]), out_size)
