"""The inference model: the folder scripts/export.py writes and scripts/predict.py reads, writing it
(Paddle's program and weights, optionally ONNX) and running it through Paddle or onnxruntime.

An export is checked before it counts: the written model is loaded back and must reproduce the
dynamic model's logits on a random batch to within TOLERANCE."""

import hashlib
import importlib
import json
import os

from rdrop import atomic
from rdrop.errors import UserError

import numpy as np
import paddle
from paddle.static import InputSpec

MODEL_PREFIX = "inference"
PROGRAM_SUFFIXES = (".json", ".pdmodel")  # PIR, legacy IR
PARAMS_FILE = MODEL_PREFIX + ".pdiparams"
METADATA_FILE = "metadata.json"
ONNX_FILE = "model.onnx"
# Everything an export folder may hold (`paddle.jit.save` adds `.pdiparams.info` with the legacy IR);
# a folder holding anything else is never replaced by an export.
EXPORT_FILES = {MODEL_PREFIX + suffix for suffix in PROGRAM_SUFFIXES} | {
    PARAMS_FILE,
    PARAMS_FILE + ".info",
    METADATA_FILE,
    ONNX_FILE,
}
RUNTIMES = ("paddle", "onnx")
# metadata.json's SHA-256 of the weights each runtime reads (model.onnx holds its own weights), so that
# predict.py can tell them from another model's weights of the same shapes.
DIGEST_KEYS = {"paddle": "params_sha256", "onnx": "onnx_sha256"}

TOLERANCE = 1e-4
CHECK_BATCH = 2
CHECK_SEED = 0
ONNX_OPSET = 17


def program_file(folder):
    """The program file `paddle.jit.save` wrote into `folder` (its name depends on the IR), or None."""
    for suffix in PROGRAM_SUFFIXES:
        path = os.path.join(folder, MODEL_PREFIX + suffix)
        if os.path.isfile(path):
            return path
    return None


def _export_problem(folder):
    """Why `folder` is neither empty nor recognisably an export this project wrote, or None: an
    export holds only the files an export holds (never a subfolder), its weights, and a
    metadata.json that reads as an export's."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError as error:
        return f"its files cannot be listed ({error.strerror})"
    if not entries:
        return None
    foreign = [name for name in entries if name not in EXPORT_FILES or not os.path.isfile(os.path.join(folder, name))]
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        return f"it holds {shown}, which an export does not"
    if PARAMS_FILE not in entries:
        return f"it has no {PARAMS_FILE}"
    try:
        with open(os.path.join(folder, METADATA_FILE), encoding="utf-8") as stream:
            metadata = json.load(stream)
    except (OSError, ValueError, RecursionError) as error:
        return f"its {METADATA_FILE} cannot be read as an export's ({type(error).__name__})"
    if not isinstance(metadata, dict) or metadata.get("params_file") != PARAMS_FILE or "img_size" not in metadata:
        return f"its {METADATA_FILE} is not an export's (no img_size, or params_file is not {PARAMS_FILE})"
    return None


def check_replaceable(output):
    """A UserError, before any work, if `output` exists and is not an empty folder or an earlier
    export: scripts/export.py replaces the folder whole, so anything else in it would be lost."""
    if not os.path.isdir(output) or os.path.islink(output):
        return  # nothing to lose (atomic.check_writable refuses a file or a link at `output`)
    problem = _export_problem(output)
    if problem is not None:
        raise UserError(
            f"The --output folder '{output}' is not an earlier export ({problem}), and an export replaces "
            f"its --output folder whole, deleting everything in it. Nothing was written or deleted. "
            f"Choose a new folder (or an earlier export to replace), or move what you keep out of "
            f"'{output}' first."
        )


def file_digest(path):
    """The file's SHA-256, hex, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_packages(names, needed_for):
    """The modules `names` (optional packages, pinned in requirements/export.txt), or a UserError."""
    try:
        return tuple(importlib.import_module(name) for name in names)
    except ImportError as error:
        raise UserError(
            f"{needed_for} needs {' and '.join(names)} ({error}). Install them with pip install -r "
            f"requirements/export.txt."
        ) from None


def paddle_runner(folder):
    """A function from a float32 N x 3 x S x S batch (NumPy) to the logits of the Paddle model in `folder`."""
    model = paddle.jit.load(os.path.join(folder, MODEL_PREFIX))
    model.eval()

    def run(batch):
        with paddle.no_grad():
            return model(paddle.to_tensor(batch)).numpy()

    return run


def onnx_runner(folder, onnxruntime):
    """The same for the folder's ONNX model, run by onnxruntime on the CPU."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: not its notes on paddle2onnx's unused constants
    session = onnxruntime.InferenceSession(os.path.join(folder, ONNX_FILE), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda batch: session.run(None, {name: batch})[0]


def check_batch(img_size):
    """A fixed random input batch for comparing the exported model with the dynamic one."""
    return np.random.default_rng(CHECK_SEED).standard_normal((CHECK_BATCH, 3, img_size, img_size)).astype(np.float32)


def write_onnx(folder, program, paddle2onnx):
    """Convert the inference model in `folder` to ONNX beside it."""
    try:
        # Without save_file paddle2onnx returns the model instead of optimising it with polygraphy,
        # which would try to pip-install packages of its own.
        model = paddle2onnx.export(program, os.path.join(folder, PARAMS_FILE), save_file=None, opset_version=ONNX_OPSET)
    except Exception as error:  # paddle2onnx logs the cause, then fails on its own missing result
        raise UserError(
            f"paddle2onnx {paddle2onnx.__version__} could not convert the model ({type(error).__name__}: "
            f"{error}; its log above says why). Export without --onnx, or use the versions in "
            f"requirements/export.txt."
        ) from None
    with open(os.path.join(folder, ONNX_FILE), "wb") as stream:
        stream.write(model)


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


def write(folder, model, size, output, metadata, onnx_modules):
    """Write and check the inference model of `model` (and its ONNX form with `onnx_modules`, the
    modules paddle2onnx and onnxruntime) and `metadata` into the new folder `folder`, which will
    replace `output`; returns {runtime: largest logit difference}."""
    os.makedirs(folder)
    batch = check_batch(size)
    with paddle.no_grad():
        expected = model(paddle.to_tensor(batch)).numpy()  # before saving, which traces the forward
    input_spec = [InputSpec([None, 3, size, size], "float32", name="images")]
    paddle.jit.save(model, os.path.join(folder, MODEL_PREFIX), input_spec=input_spec)
    program = program_file(folder)
    paddle_read = read_back("Paddle", lambda: paddle_runner(folder)(batch), output)
    differences = {"paddle": check_logits("Paddle", paddle_read, expected, output)}
    if onnx_modules:
        paddle2onnx, onnxruntime = onnx_modules
        write_onnx(folder, program, paddle2onnx)
        onnx_read = read_back("ONNX", lambda: onnx_runner(folder, onnxruntime)(batch), output)
        differences["onnx"] = check_logits("ONNX", onnx_read, expected, output)
    digests = {DIGEST_KEYS["paddle"]: file_digest(os.path.join(folder, PARAMS_FILE))}
    if onnx_modules:
        digests[DIGEST_KEYS["onnx"]] = file_digest(os.path.join(folder, ONNX_FILE))
    atomic.write_json(
        os.path.join(folder, METADATA_FILE), dict(metadata, program_file=os.path.basename(program), **digests)
    )
    return differences
