"""The folder scripts/export.py writes and scripts/predict.py reads: its file names, in one place."""

import os

MODEL_PREFIX = "inference"
PROGRAM_SUFFIXES = (".json", ".pdmodel")  # PIR, legacy IR
PARAMS_FILE = MODEL_PREFIX + ".pdiparams"
METADATA_FILE = "metadata.json"
ONNX_FILE = "model.onnx"


def program_file(folder):
    """The program file `paddle.jit.save` wrote into `folder` (its name depends on the IR), or None."""
    for suffix in PROGRAM_SUFFIXES:
        path = os.path.join(folder, MODEL_PREFIX + suffix)
        if os.path.isfile(path):
            return path
    return None
