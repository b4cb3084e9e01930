"""Export trained weights as a Paddle inference model, with what scripts/predict.py needs beside it.

    python scripts/export.py --checkpoint output/run/best.pdparams --output exported/run
    python scripts/export.py --checkpoint ViT-B_16.npz --config configs/vit_b16_cifar100.yaml --output exported/b16
    python scripts/export.py --checkpoint output/run/best.pdparams --output exported/run --onnx

Writes the output folder, through `paddle.jit.save` with a dynamic batch size:

    inference.json       the program (Paddle 3's PIR format; `inference.pdmodel` with the legacy IR)
    inference.pdiparams  the weights
    model.onnx           with --onnx: the same model in ONNX (paddle2onnx), dynamic batch size
    metadata.json        img_size, normalisation (mean/std per RGB channel on the [0, 1] pixel
                         scale), class names and where the weights came from

The input is float32 N x 3 x img_size x img_size RGB, preprocessed as evaluation does (whole image
resized bilinearly, normalised with the mean/std above); the output is N x num_classes logits.
After saving, the model is loaded back with `paddle.jit.load` (and the ONNX model run by
onnxruntime) and must reproduce the dynamic model's logits on a random batch to within 1e-4, or the
export fails. Weights are loaded as strictly as by eval.py, and without --config the config.yaml of
the checkpoint's run is used.

The folder is written beside the target under a hidden name and renamed only once it is complete and
checked (rdrop/atomic.py): a failed export, a full disk included, leaves the previous export intact.
--onnx needs `pip install -r requirements/export.txt` (paddle2onnx and onnxruntime).
"""

import argparse
import importlib
import json
import logging
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from rdrop import atomic, checkpoint, config, exported, logs, runtime
from rdrop.errors import UserError, exit_on_user_error

import numpy as np
import paddle
from paddle.static import InputSpec

import data
import models
from data import transforms

logger = logging.getLogger("export")

TOLERANCE = 1e-4
CHECK_BATCH = 2
CHECK_SEED = 0
ONNX_OPSET = 17
ONNX_PACKAGES = ("paddle2onnx", "onnxruntime")  # pinned in requirements/export.txt


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, .pdparams or Google .npz")
    config.add_arguments(parser, "YAML config; default: the config.yaml of the checkpoint's run")
    parser.add_argument("--output", required=True, help="folder to write the inference model into")
    parser.add_argument("--onnx", action="store_true", help=f"also write {exported.ONNX_FILE} (paddle2onnx)")
    return parser.parse_args(argv)


def export_metadata(cfg, class_names, checkpoint, config_path, onnx):
    """What predict.py needs besides the model; `program_file` is added once the program is written."""
    channels = 3
    return {
        "img_size": cfg["model"]["img_size"],
        "mean": [transforms.MEAN] * channels,
        "std": [transforms.STD] * channels,
        "pixel_scale": 255.0,
        "input": "float32 N x 3 x img_size x img_size, RGB, (pixel / pixel_scale - mean) / std",
        "resize": "whole image, bilinear with half-pixel centres (data.transforms.resized_crop)",
        "num_classes": cfg["model"]["num_classes"],
        "class_names": class_names,
        "params_file": exported.PARAMS_FILE,
        "onnx_file": exported.ONNX_FILE if onnx else None,
        "checkpoint": os.path.abspath(checkpoint),
        "config": os.path.abspath(config_path),
        "model": cfg["model"],
    }


def check_batch(img_size):
    """A fixed random input batch for comparing the exported model with the dynamic one."""
    return np.random.default_rng(CHECK_SEED).standard_normal((CHECK_BATCH, 3, img_size, img_size)).astype(np.float32)


def onnx_modules():
    """(paddle2onnx, onnxruntime), or a UserError before any work if they are not installed."""
    try:
        return tuple(importlib.import_module(name) for name in ONNX_PACKAGES)
    except ImportError as error:
        raise UserError(
            f"--onnx needs paddle2onnx and onnxruntime ({error}). Install them with pip install -r "
            f"requirements/export.txt, or export without --onnx."
        ) from None


@paddle.no_grad()
def paddle_logits(prefix, batch):
    reloaded = paddle.jit.load(prefix)
    reloaded.eval()
    return reloaded(paddle.to_tensor(batch)).numpy()


def write_onnx(folder, program, paddle2onnx):
    """Convert the inference model in `folder` to ONNX beside it; returns the ONNX file's path."""
    try:
        # Without save_file paddle2onnx returns the model instead of optimising it with polygraphy,
        # which would try to pip-install packages of its own.
        model = paddle2onnx.export(
            program, os.path.join(folder, exported.PARAMS_FILE), save_file=None, opset_version=ONNX_OPSET
        )
    except Exception as error:  # paddle2onnx logs the cause, then fails on its own missing result
        raise UserError(
            f"paddle2onnx {paddle2onnx.__version__} could not convert the model ({type(error).__name__}: "
            f"{error}; its log above says why). Export without --onnx, or use the versions in "
            f"requirements/export.txt."
        ) from None
    path = os.path.join(folder, exported.ONNX_FILE)
    with open(path, "wb") as stream:
        stream.write(model)
    return path


def onnx_logits(path, batch, onnxruntime):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: not its notes on paddle2onnx's unused constants
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def check_logits(what, logits, expected, output):
    """The largest difference between `logits` and the dynamic model's, or a UserError if too large."""
    difference = float(np.max(np.abs(logits - expected)))
    if not difference <= TOLERANCE:
        raise UserError(
            f"The exported {what} model for '{output}' does not reproduce the trained model: its "
            f"logits differ by up to {difference:.3g} (> {TOLERANCE}) on a random batch, so it was not "
            f"written. Report this with your Paddle version ({paddle.__version__})."
        )
    return difference


def read_back(what, read, output):
    """`read()` (loading and running a model just written), or a UserError if it cannot be read."""
    try:
        return read()
    except Exception as error:  # a truncated file fails deep inside Paddle or onnxruntime
        raise UserError(
            f"The {what} model written for '{output}' cannot be read back ({type(error).__name__}: "
            f"{' '.join(str(error).split())[:300]}). The disk may be full: free space and export "
            f"again. The previous export in '{output}', if any, is unchanged."
        ) from None


def write_export(folder, model, size, output, metadata, modules):
    """Write and check the inference model (and ONNX with `modules`) in `folder`; {format: difference}."""
    os.makedirs(folder)
    prefix = os.path.join(folder, exported.MODEL_PREFIX)
    batch = check_batch(size)
    with paddle.no_grad():
        expected = model(paddle.to_tensor(batch)).numpy()  # before saving, which traces the forward
    paddle.jit.save(model, prefix, input_spec=[InputSpec([None, 3, size, size], "float32", name="images")])
    program = exported.program_file(folder)
    paddle_read = read_back("Paddle", lambda: paddle_logits(prefix, batch), output)
    differences = {"paddle": check_logits("Paddle", paddle_read, expected, output)}
    if modules:
        paddle2onnx, onnxruntime = modules
        onnx_path = write_onnx(folder, program, paddle2onnx)
        onnx_read = read_back("ONNX", lambda: onnx_logits(onnx_path, batch, onnxruntime), output)
        differences["onnx"] = check_logits("ONNX", onnx_read, expected, output)
    metadata["program_file"] = os.path.basename(program)
    with open(os.path.join(folder, exported.METADATA_FILE), "w", encoding="utf-8") as stream:
        json.dump(metadata, stream, indent=2)
    return differences


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    logs.setup_single_process()
    modules = onnx_modules() if args.onnx else None
    atomic.check_writable(args.output, "the --output folder", is_folder=True)
    config_path = args.config or checkpoint.run_config_path(args.checkpoint)
    cfg = config.load(config_path, args.override)
    runtime.configure_cpu(cfg["train"]["cpu_threads"])
    model = models.load_trained(args.checkpoint, cfg)
    model.eval()
    class_names = list(data.class_names(cfg))
    class_names += [f"class_{index}" for index in range(len(class_names), cfg["model"]["num_classes"])]

    metadata = export_metadata(cfg, class_names, args.checkpoint, config_path, args.onnx)
    try:
        with atomic.replacing(args.output) as folder:
            differences = write_export(folder, model, cfg["model"]["img_size"], args.output, metadata, modules)
    except OSError as error:
        raise atomic.write_error("the export to", args.output, error) from None
    logger.info(
        "Exported %s to %s (%s); reloaded logits match the dynamic model's to %s",
        args.checkpoint,
        args.output,
        ", ".join(sorted(os.listdir(args.output))),
        ", ".join(f"{difference:.2e} ({name})" for name, difference in differences.items()),
    )
    return {"output": args.output, "program": exported.program_file(args.output), "max_abs_difference": differences}


if __name__ == "__main__":
    main()
