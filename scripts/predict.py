"""Classify image files with a model exported by scripts/export.py; prints the top-5 classes of each.

    python scripts/predict.py --model exported/run photo.jpg other.png
    python scripts/predict.py --model exported/run --top 3 images/*.png

Images (PNG, JPEG or anything else Pillow reads) are converted to RGB and preprocessed exactly as
evaluation preprocesses test images, by the same function (`data.transforms.resized_crop` on the
whole image): resized to the exported img_size with bilinear sampling, then normalised. Like
evaluation, the whole image is resized to a square (no centre crop), and there is no anti-aliasing
when shrinking: the model was fine-tuned on 32 x 32 CIFAR images enlarged to img_size, so photos
far larger than that are a different input distribution.
"""

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from rdrop import runtime
from rdrop.errors import UserError, exit_on_user_error

import numpy as np
import paddle
from PIL import Image, ImageOps, UnidentifiedImageError

from data import transforms

METADATA_FILE = "metadata.json"  # written by scripts/export.py
BATCH_SIZE = 32


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder written by scripts/export.py")
    parser.add_argument("--top", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ...)")
    return parser.parse_args(argv)


def read_metadata(model_dir):
    path = os.path.join(model_dir, METADATA_FILE)
    try:
        with open(path, encoding="utf-8") as stream:
            metadata = json.load(stream)
        program = os.path.join(model_dir, metadata["program_file"])
        params = os.path.join(model_dir, metadata["params_file"])
        img_size, class_names = int(metadata["img_size"]), list(metadata["class_names"])
        normalisation = (metadata["mean"], metadata["std"], metadata["pixel_scale"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(
            f"'{model_dir}' is not a model exported by scripts/export.py: {path} is missing or "
            f"incomplete ({type(error).__name__}: {error}). Export one with python "
            f"scripts/export.py --checkpoint ... --output {model_dir}."
        ) from None
    for file in (program, params):
        if not os.path.isfile(file):
            raise UserError(
                f"The exported model in '{model_dir}' is incomplete: {file} is missing. Export it "
                f"again with scripts/export.py."
            )
    # The pixels are prepared by data.transforms below; a model exported with another normalisation
    # would silently get wrong inputs.
    expected = ([transforms.MEAN] * 3, [transforms.STD] * 3, 255.0)
    if not np.allclose(
        np.concatenate([np.ravel(part) for part in normalisation]),
        np.concatenate([np.ravel(part) for part in expected]),
    ):
        raise UserError(
            f"The model in '{model_dir}' expects mean {normalisation[0]}, std {normalisation[1]} on "
            f"pixels / {normalisation[2]}, but this version of predict.py prepares mean "
            f"{expected[0]}, std {expected[1]} on pixels / {expected[2]}. Use the predict.py of the "
            f"version that exported it, or export it again."
        )
    return os.path.splitext(program)[0], img_size, class_names


def preprocess(path, img_size):
    """float32 3 x img_size x img_size: the file's pixels prepared as evaluation prepares test images."""
    try:
        with Image.open(path) as image:
            rgb = ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UserError(
            f"Cannot read '{path}' as an image ({type(error).__name__}: {error}). Pass PNG or JPEG files."
        ) from None
    pixels = np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)  # HWC -> CHW, as the datasets store images
    return transforms.resized_crop(pixels, transforms.whole_image_box(*pixels.shape[1:]), img_size)


def softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def predict(model_dir, image_paths, top=5):
    """[(path, [(class name, probability), ...] best first)] for each image."""
    prefix, img_size, class_names = read_metadata(model_dir)
    model = paddle.jit.load(prefix)
    model.eval()
    results = []
    for start in range(0, len(image_paths), BATCH_SIZE):
        paths = image_paths[start : start + BATCH_SIZE]
        batch = np.stack([preprocess(path, img_size) for path in paths])
        with paddle.no_grad():
            probabilities = softmax(model(paddle.to_tensor(batch)).numpy().astype(np.float64))
        for path, row in zip(paths, probabilities):
            best = np.argsort(-row, kind="stable")[:top]
            results.append((path, [(class_names[i], float(row[i])) for i in best]))
    return results


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}.")
    runtime.configure_cpu()
    results = predict(args.model, args.images, args.top)
    for path, ranked in results:
        print(path)
        width = max(len(name) for name, _ in ranked)
        for place, (name, probability) in enumerate(ranked, 1):
            print(f"  {place}. {name:<{width}}  {100.0 * probability:6.2f} %")
    return results


if __name__ == "__main__":
    main()
