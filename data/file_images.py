"""The per-image path of file datasets: open -> decode -> RGB -> crop and resize -> normalised CHW.

Every image file goes through `load_rgb`, in training, evaluation and predict alike: EXIF
orientation applied (as PaddleClas's OpenCV decode does), then RGB. Pillow's own conversion serves
every mode but 16-bit greyscale, which it clips to white: I;16 and I images are scaled from 0..65535
to 0..255 instead. Alpha (LA, RGBA, PA) is dropped, not composited, as torchvision's loader does;
palette images take their palette colours; CMYK uses Pillow's plain conversion.

Training: a crop box from `data.transforms.sample_crop_box` (the recipe's RandomResizedCrop
distribution), cropped and resized to img_size x img_size; evaluation: the whole image resized to
img_size x img_size, like the public code's `Resize((S, S))`. Both resize with Pillow's antialiased
bilinear filter to uint8, as torchvision's and Paddle's PIL transforms do, then map [0, 255] to
[-1, 1] as `data.transforms.normalize`.
"""

import numpy as np
from PIL import Image, ImageOps

from data.transforms import normalize, sample_crop_box

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
SIXTEEN_BIT_MAX = 65535


def load_rgb(path):
    """The file's first frame as an RGB Pillow image (raises what Pillow raises on a broken file)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image):
    if image.mode == "RGB":
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        grey = np.rint(np.clip(values, 0, SIXTEEN_BIT_MAX) * (255.0 / SIXTEEN_BIT_MAX)).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")


def train_pixels(path, rng, img_size, crop_scale):
    """float32 3 x img_size x img_size: a random resized crop of the file, normalised."""
    image = load_rgb(path)
    box = sample_crop_box(rng, image.height, image.width, crop_scale)
    crop = image.crop((box.left, box.top, box.left + box.width, box.top + box.height))
    return _normalised_chw(crop.resize((img_size, img_size), Image.Resampling.BILINEAR))


def eval_pixels(path, img_size):
    """float32 3 x img_size x img_size: the whole file resized to a square, normalised."""
    return _normalised_chw(load_rgb(path).resize((img_size, img_size), Image.Resampling.BILINEAR))


def _normalised_chw(image):
    return normalize(np.asarray(image, dtype=np.uint8)).transpose(2, 0, 1)
