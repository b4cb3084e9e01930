"""Classify image files with a model exported by scripts/export.py; prints one line per image.

    python scripts/predict.py --model exported/run photo.jpg other.png
    python scripts/predict.py --model exported/run --top 3 images/ --output predictions.csv
    python scripts/predict.py --model exported/run --runtime onnx photo.jpg    # model.onnx, by onnxruntime

Each argument is an image file or a folder; a folder contributes its image files (PNG, JPEG, BMP, GIF,
TIFF, WebP, PPM/PGM, by extension) and those of its subfolders, in sorted order. Each image's line on
standard output lists its top classes and probabilities, as soon as its batch of 32 files is
classified (memory holds one batch, however many files). An image that cannot be read (not an image,
missing, not a regular file, or a decompression bomb: more pixels than Pillow's limit) is reported on
standard error and the others are still classified; the exit code is then 2, as for any input error.
--output writes all results to a .json (a list of {file, predictions: [{class, probability}], error})
or .csv file (file, error, then class_1, probability_1, ... up to --top), replaced atomically.

Images become RGB as in training and evaluation (`data.transforms.load_rgb`: EXIF orientation, any
mode) and are preprocessed exactly as the evaluation of the model's dataset preprocesses test images
(the export's metadata says which): the whole image resized to a square of the exported img_size (no
centre crop), then normalised. For CIFAR and digits models that is `data.transforms.resized_crop`,
without anti-aliasing when shrinking (they were fine-tuned on 32 x 32 images enlarged to img_size, so
photos far larger than that are a different input distribution); for models trained on image files
(`folder`, `filelist`) it is Pillow's antialiased bilinear resize (`data.transforms.file_eval_pixels`).

--runtime onnx runs the export's model.onnx (written by export.py --onnx) through onnxruntime instead of
Paddle: pip install -r requirements/export.txt.
"""

import argparse
import csv
import json
import os
import stat
import sys
import warnings

from rdrop import atomic, inference, runtime
from rdrop.errors import USER_ERROR_EXIT_CODE, UserError, exit_on_user_error

import numpy as np
from PIL import Image

from data import transforms

BATCH_SIZE = 32
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
OUTPUT_FORMATS = (".json", ".csv")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="folder written by scripts/export.py")
    parser.add_argument("--top", type=int, default=5, help="classes to report per image (default 5)")
    parser.add_argument("--output", help="also write all results to this .json or .csv file")
    parser.add_argument(
        "--runtime", choices=inference.RUNTIMES, default="paddle", help="run the Paddle model or model.onnx"
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of them")
    return parser.parse_args(argv)


def _not_exported(model_dir, problem):
    return UserError(
        f"'{model_dir}' does not hold a usable model exported by scripts/export.py: {problem}. Export "
        f"it again with python scripts/export.py --checkpoint ... --output {model_dir}."
    )


def read_metadata(model_dir, runtime_name):
    """(img_size, class names) from the export's metadata.json, checked, for running it with `runtime_name`."""
    path = os.path.join(model_dir, inference.METADATA_FILE)
    try:
        with open(path, encoding="utf-8") as stream:
            metadata = json.load(stream)
        if runtime_name == "onnx":
            model_files = [os.path.join(model_dir, metadata["onnx_file"] or inference.ONNX_FILE)]
        else:
            model_files = [os.path.join(model_dir, metadata[key]) for key in ("program_file", "params_file")]
        img_size, class_names = metadata["img_size"], metadata["class_names"]
        resize = metadata.get("resize", transforms.ARRAY_RESIZE)
        normalisation = (metadata["mean"], metadata["std"], metadata["pixel_scale"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise _not_exported(model_dir, f"{path} is missing or incomplete ({type(error).__name__}: {error})") from None
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise _not_exported(model_dir, f"img_size in {path} is {img_size!r}, not a positive whole number")
    if not isinstance(class_names, list) or not class_names or not all(isinstance(n, str) for n in class_names):
        raise _not_exported(model_dir, f"class_names in {path} is not a non-empty list of names")
    for file in model_files:
        if not os.path.isfile(file):
            without_onnx = " (export.py writes it with --onnx)" if runtime_name == "onnx" else ""
            raise _not_exported(model_dir, f"{file} is missing{without_onnx}")
    # A weights file swapped in from another model of the same shape would load and classify.
    weights, digest_key = model_files[-1], inference.DIGEST_KEYS[runtime_name]
    if digest_key not in metadata:
        raise _not_exported(model_dir, f"{path} records no {digest_key} of {weights} (an export of an earlier version)")
    if inference.file_digest(weights) != metadata[digest_key]:
        raise _not_exported(
            model_dir,
            f"{weights} is not the file this export wrote: its SHA-256 differs from {digest_key} in {path} "
            f"(weights copied in from another model, or a damaged file)",
        )
    # The pixels are prepared by data.transforms below; a model exported with another normalisation
    # would silently get wrong inputs.
    expected = ([transforms.MEAN] * 3, [transforms.STD] * 3, 255.0)
    try:
        matches = np.allclose(
            np.concatenate([np.ravel(part) for part in normalisation]).astype(np.float64),
            np.concatenate([np.ravel(part) for part in expected]),
        )
    except ValueError:
        matches = False
    if not matches:
        raise UserError(
            f"The model in '{model_dir}' expects mean {normalisation[0]}, std {normalisation[1]} on "
            f"pixels / {normalisation[2]}, but this version of predict.py prepares mean "
            f"{expected[0]}, std {expected[1]} on pixels / {expected[2]}. Use the predict.py of the "
            f"version that exported it, or export it again."
        )
    return img_size, class_names, resize


def load_model(model_dir, runtime_name="paddle"):
    """A function from a batch of preprocessed images to logits, running the export through
    `runtime_name`, and the export's (img_size, class names); checked by classifying one blank image."""
    if runtime_name == "onnx":
        (onnxruntime,) = inference.import_packages(("onnxruntime",), "--runtime onnx")
    img_size, class_names, resize = read_metadata(model_dir, runtime_name)
    try:
        model = (
            inference.onnx_runner(model_dir, onnxruntime)
            if runtime_name == "onnx"
            else inference.paddle_runner(model_dir)
        )
        width = model(np.zeros([1, 3, img_size, img_size], np.float32)).shape[-1]
    except Exception as error:  # truncated or edited files fail deep inside the runtime, with many types
        message = " ".join(str(error).split())[:300]
        name = "onnxruntime" if runtime_name == "onnx" else "Paddle"
        raise _not_exported(
            model_dir,
            f"{name} cannot load or run it on {img_size} x {img_size} images ({type(error).__name__}: {message})",
        ) from None
    if width != len(class_names):
        raise _not_exported(
            model_dir, f"the model has {width} outputs but metadata.json names {len(class_names)} classes"
        )
    return model, img_size, class_names, resize


def image_files(arguments):
    """[(path, None)] for each image to classify, or (argument, error message) for an argument that is
    neither an image file nor a folder holding some."""
    found = []
    for argument in arguments:
        if os.path.isdir(argument):
            inside = sorted(
                os.path.join(folder, name)
                for folder, _, names in os.walk(argument)
                for name in names
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
            )
            found += [(path, None) for path in inside] or [(argument, "folder holds no image files")]
        elif os.path.lexists(argument):
            found.append((argument, None))  # preprocess refuses what is not a regular file
        else:
            found.append((argument, "no such file or folder"))
    return found


def preprocess(path, img_size, resize):
    """float32 3 x img_size x img_size: the file's pixels prepared as evaluation prepares test images.

    Opened without blocking and refused unless a regular file: reading a FIFO named like an image would
    wait forever for a writer. Images above Pillow's pixel limit are refused: Pillow itself raises
    only above twice the limit and merely warns between once and twice, where decoding still takes
    gigabytes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as stream:
                if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                    raise UserError("not a regular file (a FIFO, device or socket, which may never end); refused")
                return transforms.prepared_for_prediction(stream, img_size, resize)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UserError(f"refused: {error}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as error:  # Pillow's decoders raise these on broken files
        raise UserError(f"not a readable image ({type(error).__name__}: {error})") from None


def softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def classify(model, img_size, resize, class_names, paths, top):
    """{path: (ranked [(class name, probability)] best first, or None; error message or None)} for
    `paths`, at most BATCH_SIZE of them, read and classified together."""
    results, readable = {}, []
    for path in paths:
        try:
            readable.append((path, preprocess(path, img_size, resize)))
        except UserError as error:
            results[path] = (None, str(error))
    if readable:
        logits = model(np.stack([pixels for _, pixels in readable]))
        for (path, _), row in zip(readable, softmax(logits.astype(np.float64))):
            best = np.argsort(-row, kind="stable")[:top]
            results[path] = ([(class_names[i], float(row[i])) for i in best], None)
    return results


def predict(model_dir, arguments, top=5, runtime_name="paddle"):
    """Yields (path, ranked or None, error or None) in argument order, folders expanded (see the module
    doc), BATCH_SIZE files at a time: memory holds one batch of images however many files there are."""
    model, img_size, class_names, resize = load_model(model_dir, runtime_name)
    found = image_files(arguments)
    for start in range(0, len(found), BATCH_SIZE):
        batch = found[start : start + BATCH_SIZE]
        results = classify(model, img_size, resize, class_names, [path for path, error in batch if error is None], top)
        for path, error in batch:
            yield (path, *results[path]) if error is None else (path, None, error)


def write_output(results, path, top):
    if path.lower().endswith(".json"):
        rows = [
            {
                "file": file,
                "predictions": [{"class": name, "probability": p} for name, p in ranked or []],
                "error": error,
            }
            for file, ranked, error in results
        ]
        atomic.write_json(path, rows)
        return
    with atomic.replacing(path) as partial, open(partial, "w", encoding="utf-8", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(
            ["file", "error"] + [f"{field}_{k}" for k in range(1, top + 1) for field in ("class", "probability")]
        )
        for file, ranked, error in results:
            writer.writerow([file, error or ""] + [value for name, p in ranked or [] for value in (name, f"{p:.6g}")])


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}.")
    if args.output:
        if not args.output.lower().endswith(OUTPUT_FORMATS):
            raise UserError(f"--output '{args.output}' must end in .json or .csv, which selects the format.")
        atomic.check_writable(args.output, "--output")
    runtime.configure_cpu()
    results = []
    for path, ranked, error in predict(args.model, args.images, args.top, args.runtime):
        if error is None:
            print(f"{path}: " + ", ".join(f"{name} {100.0 * p:.2f} %" for name, p in ranked), flush=True)
        else:
            print(f"error: {path}: {error}", file=sys.stderr, flush=True)
        results.append((path, ranked, error))
    if args.output:
        try:
            write_output(results, args.output, args.top)
        except OSError as error:
            raise atomic.write_error("the results to --output", args.output, error) from None
        print(f"Wrote the results of {len(results)} file(s) to {args.output}", file=sys.stderr, flush=True)
    failed = sum(error is not None for _, _, error in results)
    if failed:
        print(f"error: {failed} of {len(results)} file(s) could not be classified (see above)", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT_CODE)
    return results


if __name__ == "__main__":
    main()
