"""Export trained weights as a Paddle inference model, with what scripts/predict.py needs beside it.

    python scripts/export.py --checkpoint output/run/best.pdparams --output exported/run
    python scripts/export.py --checkpoint ViT-B_16.npz --config configs/vit_b16_cifar100.yaml --output exported/b16

Writes into the output folder, through `paddle.jit.save` with a dynamic batch size:

    inference.json       the program (Paddle 3's PIR format; `inference.pdmodel` with the legacy IR)
    inference.pdiparams  the weights
    metadata.json        img_size, normalisation (mean/std per RGB channel on the [0, 1] pixel
                         scale), class names and where the weights came from

The input is float32 N x 3 x img_size x img_size RGB, preprocessed as evaluation does (whole image
resized bilinearly, normalised with the mean/std above); the output is N x num_classes logits.
After saving, the model is loaded back with `paddle.jit.load` and must reproduce the dynamic
model's logits on a random batch to within 1e-4, or the export fails. Weights are loaded as strictly
as by eval.py, and without --config the config.yaml of the checkpoint's run is used.
"""

import argparse
import json
import logging
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from rdrop import config, evaluation, logs, runtime
from rdrop.errors import UserError, exit_on_user_error

import numpy as np
import paddle
from paddle.static import InputSpec

import data
import models
from data import transforms

logger = logging.getLogger("export")

MODEL_PREFIX = "inference"
PROGRAM_SUFFIXES = (".json", ".pdmodel")  # PIR, legacy IR
PARAMS_SUFFIX = ".pdiparams"
METADATA_FILE = "metadata.json"
TOLERANCE = 1e-4
CHECK_BATCH = 2
CHECK_SEED = 0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, .pdparams or Google .npz")
    config.add_arguments(parser, "YAML config; default: the config.yaml of the checkpoint's run")
    parser.add_argument("--output", required=True, help="folder to write the inference model into")
    return parser.parse_args(argv)


def program_file(output_dir):
    """The program file `paddle.jit.save` wrote into `output_dir` (its name depends on the IR), or None."""
    for suffix in PROGRAM_SUFFIXES:
        path = os.path.join(output_dir, MODEL_PREFIX + suffix)
        if os.path.isfile(path):
            return path
    return None


def export_metadata(cfg, class_names, checkpoint, config_path, program):
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
        "program_file": os.path.basename(program),
        "params_file": MODEL_PREFIX + PARAMS_SUFFIX,
        "checkpoint": os.path.abspath(checkpoint),
        "config": os.path.abspath(config_path),
        "model": cfg["model"],
    }


def check_batch(img_size):
    """A fixed random input batch for comparing the exported model with the dynamic one."""
    batch = np.random.default_rng(CHECK_SEED).standard_normal((CHECK_BATCH, 3, img_size, img_size))
    return paddle.to_tensor(batch.astype(np.float32))


@paddle.no_grad()
def reloaded_logits(prefix, batch):
    reloaded = paddle.jit.load(prefix)
    reloaded.eval()
    return reloaded(batch).numpy()


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    logs.setup_single_process()
    config_path = args.config or evaluation.run_config_path(args.checkpoint)
    cfg = config.load(config_path, args.override)
    cfg["model"]["pretrained"] = None  # the checkpoint's weights replace whatever training started from
    runtime.configure_cpu(cfg["train"]["cpu_threads"])
    model = models.build_model(cfg["model"])
    evaluation.load_trained_weights(model, args.checkpoint)
    model.eval()
    class_names = list(data.class_names(cfg))
    class_names += [f"class_{index}" for index in range(len(class_names), cfg["model"]["num_classes"])]

    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"Cannot create the --output folder '{args.output}' ({error.strerror}). Choose a writable folder."
        ) from None
    prefix = os.path.join(args.output, MODEL_PREFIX)
    size = cfg["model"]["img_size"]
    batch = check_batch(size)
    with paddle.no_grad():
        expected = model(batch).numpy()  # before saving, which traces (and may re-wrap) the forward
    paddle.jit.save(model, prefix, input_spec=[InputSpec([None, 3, size, size], "float32", name="images")])
    program = program_file(args.output)
    difference = float(np.max(np.abs(reloaded_logits(prefix, batch) - expected)))
    if not difference <= TOLERANCE:
        raise UserError(
            f"The exported model in '{args.output}' does not reproduce the trained model: its logits "
            f"differ by up to {difference:.3g} (> {TOLERANCE}) on a random batch, so it must not be "
            f"used. Report this with your Paddle version ({paddle.__version__})."
        )
    metadata = export_metadata(cfg, class_names, args.checkpoint, config_path, program)
    with open(os.path.join(args.output, METADATA_FILE), "w", encoding="utf-8") as stream:
        json.dump(metadata, stream, indent=2)
    logger.info(
        "Exported %s to %s (%s, %s, %s); reloaded logits match the dynamic model's to %.2e",
        args.checkpoint,
        args.output,
        os.path.basename(program),
        metadata["params_file"],
        METADATA_FILE,
        difference,
    )
    return {"output": args.output, "program": program, "max_abs_difference": difference}


if __name__ == "__main__":
    main()
