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
export fails (rdrop/inference.py). Weights are loaded as strictly as by eval.py, and without --config the config.yaml of
the checkpoint's run is used.

The folder is written beside the target under a hidden name and renamed only once it is complete and
checked (rdrop/atomic.py): a failed export, a full disk included, leaves the previous export intact.
An existing --output folder is replaced only if it is empty or an earlier export (only an export's
files, and a metadata.json that reads as an export's); anything else is refused before any work.
--onnx needs `pip install -r requirements/export.txt` (paddle2onnx and onnxruntime).
"""

import argparse
import logging
import os

from rdrop import atomic, checkpoint, config, inference, logs, runtime
from rdrop.errors import exit_on_user_error

import data
import models
from data import transforms

logger = logging.getLogger("export")

ONNX_PACKAGES = ("paddle2onnx", "onnxruntime")  # pinned in requirements/export.txt


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder, .pdparams or Google .npz")
    config.add_arguments(parser, "YAML config; default: the config.yaml of the checkpoint's run")
    parser.add_argument("--output", required=True, help="folder to write the inference model into")
    parser.add_argument("--onnx", action="store_true", help=f"also write {inference.ONNX_FILE} (paddle2onnx)")
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
        "resize": transforms.eval_resize(cfg["data"]["dataset"]),
        "num_classes": cfg["model"]["num_classes"],
        "class_names": class_names,
        "params_file": inference.PARAMS_FILE,
        "onnx_file": inference.ONNX_FILE if onnx else None,
        "checkpoint": os.path.abspath(checkpoint),
        "config": os.path.abspath(config_path),
        "model": cfg["model"],
    }


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    logs.setup_single_process()
    modules = inference.import_packages(ONNX_PACKAGES, "--onnx") if args.onnx else None
    atomic.check_writable(args.output, "the --output folder", is_folder=True)
    inference.check_replaceable(args.output)
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
            differences = inference.write(folder, model, cfg["model"]["img_size"], args.output, metadata, modules)
    except OSError as error:
        raise atomic.write_error("the export to", args.output, error) from None
    logger.info(
        "Exported %s to %s (%s); reloaded logits match the dynamic model's to %s",
        args.checkpoint,
        args.output,
        ", ".join(sorted(os.listdir(args.output))),
        ", ".join(f"{difference:.2e} ({name})" for name, difference in differences.items()),
    )
    return {"output": args.output, "program": inference.program_file(args.output), "max_abs_difference": differences}


if __name__ == "__main__":
    main()
