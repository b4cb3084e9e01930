"""Preflight for GPU users: checks, in about two minutes on one GPU, everything that only a GPU run
takes, before the paper configs spend GPU-hours on it.

    python scripts/gpu_check.py [--config configs/vit_b16_cifar100_rdrop.yaml] [-o section.key=value ...]

Prints one row per check, PASS, FAIL or SKIPPED with the reason, then a closing line, and exits
with 1 if any check failed, with 3 if none ran (every row SKIPPED, as on a machine without a GPU:
the closing line then says that nothing was checked), and with 0 otherwise:

    build          the Paddle package is the CUDA build (not the CPU package, not both), its CUDA and
                   cuDNN versions, and the GPUs it sees
    attention      under bf16 autocast, attention at the config's shapes takes the flash kernel, and the
                   logits agree with float32 logits of the same random weights (relative error below
                   BF16_LOGITS_TOLERANCE)
    bf16 step      one R-Drop step in bf16 of the config's model at its micro-batch: the gradients of
                   every block (and of the embedding, final norm and head) finite and within
                   BF16_GRADIENT_TOLERANCE (relative error) of float32 ones of the same weights
    fp16 resume    an fp16 run saves a checkpoint as train.py does and resumes with its loss scale and
                   counters intact, then steps on
    accumulation   with 2 or more GPUs: 2 processes x 2 micro-batches end with the weights of 1 process
                   x 4 micro-batches (gradients all-reduced over NCCL), and each optimizer step
                   all-reduces the gradients once (no_sync on the other micro-batches) and the
                   finite/stop flag once: no more, no fewer
    speed          images/s per GPU of the config's training step as a launch on all the GPUs here runs
                   it (each GPU's share of the global batch in the micro-batches that world size gives),
                   fed by the training loader and the device crop; FAIL below SPEED_FLOOR_UTILISATION
                   (half the utilisation docs/performance.md expects) of the GPU's dense peak. What
                   train.recompute saves: scripts/benchmark.py --recompute

Everything is built by rdrop.step.build_trainer, as train.py builds it, and resumed through its
`restore` hook, as train.py resumes. The model is the config's with random weights
(`model.pretrained` is not downloaded) and the data are random. On a machine without a GPU the build
row says so and the GPU rows are SKIPPED, with the test that covers the same code on CPU processes
where there is one.
"""

import argparse
import collections
import contextlib
import copy
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import traceback
from typing import NamedTuple

from rdrop import benchmarking, config, distributed
from rdrop.errors import exit_on_user_error
from rdrop.loss import RDropLoss, rdrop_logits
from rdrop.run_state import RunState
from rdrop.step import accumulation_steps, autocast, build_trainer

import numpy as np
import paddle

import data
import models

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _load_script(name):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load_script("benchmark")  # its table of the GPUs' dense peaks
DEFAULT_CONFIG = "configs/vit_b16_cifar100_rdrop.yaml"
# bf16 keeps 8 significant bits (a relative rounding error of 2**-9 per operation): this allows the
# logits about 25 such errors' worth of drift through the encoder, while a broken kernel or layout
# errs by order 1. Not calibrated on a GPU yet: a FAIL just above it deserves a look, not alarm.
BF16_LOGITS_TOLERANCE = 0.05
# One bf16 step's gradients against float32 ones of the same weights and images, per block (relative
# error of the block's gradients as one vector). A gradient passes through the forward pass and then
# the backward pass of every block above it, about twice the roundings the logits see, so this is
# twice their tolerance; a zeroed gradient errs by exactly 1 and a wrong kernel or layout by order 1.
# Not calibrated on a GPU yet either.
BF16_GRADIENT_TOLERANCE = 0.1
# Weights after the accumulation runs: the two may differ by rounding (order of the sums, TF32), not
# by this fraction of how far the updates moved them (a wrong 1/accumulation moves them twice as far).
ACCUMULATION_TOLERANCE = 1e-2
PADDLE_PACKAGES = ("paddlepaddle", "paddlepaddle-gpu")
NOTHING_CHECKED = 3  # the exit code when every row is SKIPPED: a CPU machine's report is not a pass


class Result(NamedTuple):
    status: str  # PASS, FAIL or SKIPPED
    detail: str


def passed(detail):
    return Result("PASS", detail)


def failed(detail):
    return Result("FAIL", detail)


def skipped(detail):
    return Result("SKIPPED", detail)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = str(ROOT / DEFAULT_CONFIG)  # the repository's, from whatever folder the script runs in
    config.add_arguments(parser, f"the run to check (default: {DEFAULT_CONFIG})", default=default)
    parser.add_argument("--accumulation-worker", metavar="DIR", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- the Paddle build --------------------------------------------------------------------------------


def installed_paddle_packages():
    """{distribution name: version} of the Paddle packages pip installed."""
    found = {}
    for distribution in importlib.metadata.distributions():
        name = (distribution.metadata["Name"] or "").lower()
        if name in PADDLE_PACKAGES:
            found[name] = distribution.version
    return found


def nvidia_gpus_on_machine():
    """Whether the NVIDIA driver sees a GPU, whatever Paddle build is installed."""
    folder = "/proc/driver/nvidia/gpus"
    return os.path.isdir(folder) and bool(os.listdir(folder))


def build_result(packages, cuda_build, gpus_on_machine, devices, cuda_version, cudnn_version):
    """The verdict on the Paddle install; `devices` are the names of the GPUs Paddle sees."""
    described = ", ".join(f"{name} {version}" for name, version in sorted(packages.items())) or "no pip package"
    if len(packages) > 1:
        return failed(
            f"both {described} are installed; they share the module `paddle` and break each other. Run "
            f"`pip uninstall -y paddlepaddle paddlepaddle-gpu` and `pip install -r requirements/gpu.txt`."
        )
    if not cuda_build:
        if gpus_on_machine:
            return failed(
                f"{described} is the CPU build but this machine has NVIDIA GPUs. Install the GPU build: "
                f"`pip uninstall -y paddlepaddle` and `pip install -r requirements/gpu.txt`."
            )
        return skipped(f"{described}, the CPU build, on a machine without NVIDIA GPUs")
    if not devices:
        return failed(
            f"{described} is built with CUDA {cuda_version} but sees no GPU: check the driver "
            f"(`nvidia-smi`) and CUDA_VISIBLE_DEVICES."
        )
    return passed(
        f"{described}, CUDA {cuda_version}, cuDNN {cudnn_version}, {len(devices)} GPU(s): {', '.join(devices)}"
    )


def check_build():
    cuda_build = paddle.is_compiled_with_cuda()
    devices = []
    if cuda_build:
        devices = [paddle.device.cuda.get_device_name(index) for index in range(paddle.device.cuda.device_count())]
    return build_result(
        installed_paddle_packages(),
        cuda_build,
        nvidia_gpus_on_machine(),
        devices,
        paddle.version.cuda(),
        paddle.version.cudnn(),
    )


# --- the checks that run on one GPU ------------------------------------------------------------------


def random_weights_config(cfg, **train_changes):
    """`cfg` with random weights (no download) and the given train.* values."""
    changed = copy.deepcopy(cfg)
    changed["model"]["pretrained"] = None
    changed["train"].update(train_changes)
    return changed


class _BackendRecorder(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.backends = []

    def emit(self, record):
        message = record.getMessage()
        if message.startswith("Selected backend:"):
            self.backends.append(message.split(":", 1)[1].strip())


def attention_backends(run):
    """The kernels Paddle's scaled_dot_product_attention chose (it logs each choice at debug level)
    while `run()` ran, and what `run()` returned.

    The level is changed with setLevel, which clears the logging module's cache of which levels a
    logger emits: assigning `logger.level` would keep the answer cached by an earlier SDPA call (so
    nothing would be recorded) and, after the check, keep emitting debug lines. Only the recorder
    sees the records (not the logger's own handler, nor the parents'), and everything is put back.
    """
    logger = logging.getLogger("paddle.nn.functional.sdpa")
    recorder = _BackendRecorder()
    handlers, level, propagate = logger.handlers, logger.level, logger.propagate
    logger.handlers, logger.propagate = [recorder], False
    logger.setLevel(logging.DEBUG)
    try:
        return recorder.backends, run()
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)


def relative_error(values, reference):
    return float(np.linalg.norm(values - reference) / np.linalg.norm(reference))


def bf16_unsupported():
    """Why bf16 autocast would silently run in float32 here, or None."""
    if paddle.amp.is_bfloat16_supported():
        return None
    major, minor = paddle.device.cuda.get_device_capability()
    return (
        f"{paddle.device.cuda.get_device_name()} (compute capability {major}.{minor}) has no bf16: "
        f"Paddle would train the config in float32. Use -o train.amp=fp16"
    )


def check_attention(cfg):
    if bf16_unsupported():
        return failed(bf16_unsupported())
    cfg = random_weights_config(cfg)
    model = models.build_model(cfg["model"], seed=cfg["train"]["seed"])
    paddle.nn.initializer.Normal(std=model.embed_dim**-0.5)(model.head.weight)  # the zero head gives zero logits
    model.eval()
    images, _ = benchmarking.random_batch(cfg, cfg["train"]["micro_batch_size"])

    def bf16_logits():
        with paddle.no_grad(), autocast("bf16"):
            return model(images)

    backends, logits = attention_backends(bf16_logits)
    with paddle.no_grad():
        reference = model(images).numpy()
    error = relative_error(logits.numpy(), reference)
    heads = f"{model.num_heads} heads of {model.embed_dim // model.num_heads}"
    shape = f"batch {images.shape[0]}, {model.grid_size**2 + 1} tokens, {heads}"
    if set(backends) != {"flash_attn"}:
        return failed(f"attention ({shape}) in bf16 ran {sorted(set(backends)) or 'no SDPA kernel'}, not flash_attn")
    if logits.dtype != paddle.float32 or not error < BF16_LOGITS_TOLERANCE:
        return failed(
            f"bf16 logits ({logits.dtype}) differ from float32 ones by {error:.2e} of their norm "
            f"(tolerance {BF16_LOGITS_TOLERANCE})"
        )
    return passed(
        f"flash_attn in all {len(backends)} layers ({shape}); float32 logits under bf16 within {error:.1e} "
        f"of float32 (tolerance {BF16_LOGITS_TOLERANCE})"
    )


def build(cfg, context, restore=None):
    """The trainer train.py builds for `cfg` on `context`; `restore` puts a checkpoint in."""
    return build_trainer(cfg, context, models.build_model(cfg["model"], seed=cfg["train"]["seed"]), restore)


def run_steps(trainer, micro_batch, steps):
    """`steps` optimizer steps on the same micro-batch; the losses and whether each step was finite."""
    losses, finite = [], []
    trainer.ddp_model.train()
    for step in range(steps):
        paddle.seed(step)
        outcome = trainer.train_step([micro_batch])
        losses.append(float(outcome["losses"]["objective"]))
        finite.append(not outcome["nonfinite"])
    return losses, finite


def one_micro_batch_per_step(cfg, amp, steps):
    """`cfg` with random weights, one micro-batch per step, `amp`, and a schedule `steps` long."""
    micro = cfg["train"]["micro_batch_size"]
    cfg = random_weights_config(cfg, amp=amp, global_batch_size=micro)
    cfg["schedule"].update(warmup_steps=min(cfg["schedule"]["warmup_steps"], steps // 6), total_steps=steps)
    return cfg


def gradient_group(name):
    """The part of the model a parameter belongs to, as the bf16 check reports it: `block <i>`,
    `embedding` (patch projection, class token, position embedding), `norm` or `head`."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return f"block {parts[1]}"
    if parts[0] in ("cls_token", "pos_embed", "patch_embed"):
        return "embedding"
    return parts[0]


def step_gradients(model, micro_batch, cfg, amp):
    """The gradients of one R-Drop micro-step of `model` on `micro_batch` under `amp` (the step's
    forward, loss and backward, without loss scaling), as float32 arrays by parameter name."""
    criterion = RDropLoss(cfg["rdrop"]["alpha"], cfg["rdrop"]["kl_reduction"])
    images, labels = micro_batch
    with autocast(amp):
        logits_a, logits_b = rdrop_logits(model, images, criterion.needs_two_samples, cfg["rdrop"]["concat_batch"])
    criterion(logits_a, logits_b, labels)["objective"].backward()
    gradients = {
        name: parameter.grad.astype("float32").numpy()
        for name, parameter in model.named_parameters()
        if parameter.grad is not None
    }
    model.clear_gradients()
    return gradients


def compare_gradients(gradients, reference):
    """The verdict on `gradients` (bf16) against `reference` (float32): per gradient_group, the relative
    error of the group's gradients as one vector; a missing gradient counts as zero."""
    squares = collections.defaultdict(lambda: np.zeros(2))  # group: (error, reference) sums of squares
    nonfinite = set()
    for name, expected in reference.items():
        value = gradients.get(name, np.zeros_like(expected))
        group = gradient_group(name)
        if not np.all(np.isfinite(value)):
            nonfinite.add(group)
            continue
        squares[group] += [
            np.sum(np.square(value - expected, dtype=np.float64)),
            np.sum(np.square(expected, dtype=np.float64)),
        ]
    errors = {group: float(np.sqrt(error / norm)) if norm else float("inf") for group, (error, norm) in squares.items()}
    worst = max(errors, key=errors.get) if errors else None
    summary = f"bf16 gradients vs float32, relative error per block: worst {worst} {errors.get(worst, 0):.1e}"
    if nonfinite:
        return failed(f"non-finite bf16 gradients in {sorted(nonfinite)}")
    beyond = [f"{group} {error:.2g}" for group, error in errors.items() if not error <= BF16_GRADIENT_TOLERANCE]
    if beyond:
        return failed(f"{summary}; beyond the tolerance {BF16_GRADIENT_TOLERANCE}: {', '.join(beyond)}")
    return passed(f"{summary} (tolerance {BF16_GRADIENT_TOLERANCE}) over {len(errors)} blocks")


def check_bf16_step(cfg):
    """One R-Drop step in bf16 of the config's model (random weights, a random head: the zero head
    would give the blocks no gradient) at its micro-batch, against float32. Dropout is off, so that
    both precisions compute the same function whatever random numbers their kernels draw."""
    if bf16_unsupported():
        return failed(bf16_unsupported())
    cfg = random_weights_config(cfg)
    cfg["model"].update(dropout=0.0, attn_dropout=0.0, drop_path=0.0)
    model = models.build_model(cfg["model"], seed=cfg["train"]["seed"])
    paddle.nn.initializer.Normal(std=model.embed_dim**-0.5)(model.head.weight)
    model.train()
    micro_batch = benchmarking.random_batch(cfg, cfg["train"]["micro_batch_size"])
    reference = step_gradients(model, micro_batch, cfg, "none")
    return compare_gradients(step_gradients(model, micro_batch, cfg, "bf16"), reference)


def check_fp16_resume(cfg):
    cfg = one_micro_batch_per_step(cfg, "fp16", 8)
    micro_batch = benchmarking.random_batch(cfg, cfg["train"]["micro_batch_size"])
    trainer = build(cfg, distributed.Context(0, 1))
    run_steps(trainer, micro_batch, 3)
    saved = trainer.scaler.state_dict()
    with tempfile.TemporaryDirectory() as output_dir:
        run_cfg = dict(cfg, train=dict(cfg["train"], output_dir=output_dir))
        path = RunState(run_cfg, step=3).save(trainer, stream_state={})
        resumed = build(cfg, distributed.Context(0, 1), RunState.load(path, run_cfg).restore)
    restored = resumed.scaler.state_dict()
    if not saved or restored.keys() != saved.keys():
        return failed(f"the loss scaler's state was {saved} when saved and {restored} after resuming")
    different = [key for key in saved if not np.array_equal(np.asarray(saved[key]), np.asarray(restored[key]))]
    if different:
        return failed(f"resumed loss scaler differs in {different}: saved {saved}, resumed {restored}")
    _, finite = run_steps(resumed, micro_batch, 1)
    scale = float(np.asarray(saved["scale"]).reshape(-1)[0])
    return passed(
        f"loss scale {scale:g} and counters (incr_count {saved['incr_count']}) restored; "
        f"the next step was {'finite' if finite[0] else 'skipped by the scaler (overflow)'}"
    )


# --- gradient accumulation across processes ----------------------------------------------------------

ACCUMULATION_IMAGES = 8
ACCUMULATION_STEPS = 4
COLLECTIVES_FILE = "collectives.json"
# Per optimizer step with several processes: the gradients are all-reduced once (after the last
# micro-batch; the others run under no_sync), and the finite/stop flag once (rdrop/step.py).
EXPECTED_COLLECTIVES = {"gradient rounds": 1, "other all-reduces": 1}


def accumulation_config():
    """A small ViT without dropout, R-Drop on, no clipping: 8 images per step in micro-batches of 2."""
    overrides = [
        "model.name=vit",
        "model.img_size=32",
        "model.num_classes=10",
        "model.patch_size=8",
        "model.embed_dim=64",
        "model.depth=2",
        "model.num_heads=4",
        "model.mlp_dim=128",
        "model.dropout=0.0",
        "model.pretrained=null",
        "rdrop.alpha=0.3",
        "rdrop.kl_reduction=sum",
        "optimizer.name=momentum",
        "optimizer.lr=0.05",
        "optimizer.grad_clip=null",
        "schedule.warmup_steps=1",
        f"schedule.total_steps={ACCUMULATION_STEPS}",
        f"train.global_batch_size={ACCUMULATION_IMAGES}",
        "train.micro_batch_size=2",
    ]
    return config.validate(config.apply_overrides(config.defaults(), overrides), source="the accumulation check")


class _CountingReducer:
    """DataParallel's gradient reducer, counting the backward passes whose gradients it all-reduces.

    DataParallel.forward arms its reducer with `prepare_for_backward` unless `no_sync` is on, and an
    armed reducer all-reduces every gradient during the next backward (in buckets of
    `comm_buffer_size`; paddle/distributed/parallel.py). One round per optimizer step is right."""

    def __init__(self, reducer, counts):
        self._reducer, self._counts = reducer, counts

    def prepare_for_backward(self, *arguments):
        self._counts["gradient rounds"] += 1
        return self._reducer.prepare_for_backward(*arguments)

    def __getattr__(self, name):
        return getattr(self._reducer, name)


@contextlib.contextmanager
def counting_collectives(ddp_model, context):
    """Counts of the gradient all-reduce rounds of `ddp_model` and of the calls of
    paddle.distributed.all_reduce (the step's finite/stop flag, and anything else: fleet's optimizer
    and rdrop/distributed.py all-reduce through it) while the block runs."""
    counts = collections.Counter({"gradient rounds": 0, "other all-reduces": 0})
    if context.world_size == 1:
        yield counts
        return
    reducer, all_reduce = ddp_model._reducer, paddle.distributed.all_reduce

    def counted_all_reduce(*arguments, **keywords):
        counts["other all-reduces"] += 1
        return all_reduce(*arguments, **keywords)

    ddp_model._reducer, paddle.distributed.all_reduce = _CountingReducer(reducer, counts), counted_all_reduce
    try:
        yield counts
    finally:
        ddp_model._reducer, paddle.distributed.all_reduce = reducer, all_reduce


def accumulation_worker(output_dir):
    """Run under the launcher (or alone): the ranks train on disjoint quarters or halves of the same
    random 8 images per step; rank 0 writes the weights before and after, and the collectives of
    each step, to `output_dir`."""
    context = distributed.init()
    cfg = accumulation_config()
    trainer = build(cfg, context)
    initial = {name: value.numpy() for name, value in trainer.model.state_dict().items()}
    micro, per_rank = cfg["train"]["micro_batch_size"], ACCUMULATION_IMAGES // context.world_size
    trainer.ddp_model.train()
    collectives = []
    for step in range(ACCUMULATION_STEPS):
        rng = np.random.default_rng(step)
        images = rng.standard_normal((ACCUMULATION_IMAGES, 3, 32, 32)).astype("float32")
        labels = rng.integers(0, 10, ACCUMULATION_IMAGES)
        mine = slice(context.rank * per_rank, (context.rank + 1) * per_rank)
        micro_batches = [
            (
                paddle.to_tensor(images[mine][start : start + micro]),
                paddle.to_tensor(labels[mine][start : start + micro]),
            )
            for start in range(0, per_rank, micro)
        ]
        with counting_collectives(trainer.ddp_model, context) as counts:
            trainer.train_step(micro_batches)
        collectives.append(dict(counts))
    if context.is_main:
        final = {name: value.numpy() for name, value in trainer.model.state_dict().items()}
        np.savez(os.path.join(output_dir, "initial.npz"), **initial)
        np.savez(os.path.join(output_dir, "final.npz"), **final)
        with open(os.path.join(output_dir, COLLECTIVES_FILE), "w", encoding="utf-8") as stream:
            json.dump(collectives, stream)


def accumulation_command(output_dir, processes, gpu):
    """This script as an accumulation worker, on `processes` GPUs or CPU processes."""
    worker = [str(pathlib.Path(__file__).resolve()), "--accumulation-worker", output_dir]
    if processes == 1:
        return [sys.executable, *worker]
    devices = ["--devices", ",".join(map(str, range(processes)))] if gpu else ["--nproc_per_node", str(processes)]
    log_dir = ["--log_dir", os.path.join(output_dir, "logs")]
    return [sys.executable, "-m", "paddle.distributed.launch", *devices, *log_dir, *worker]


def compare_accumulation(single_dir, ranks_dir):
    """The verdict on the two runs: the same weights, and per step exactly EXPECTED_COLLECTIVES."""
    initial = np.load(os.path.join(single_dir, "initial.npz"))
    single = np.load(os.path.join(single_dir, "final.npz"))
    ranks = np.load(os.path.join(ranks_dir, "final.npz"))
    with open(os.path.join(ranks_dir, COLLECTIVES_FILE), encoding="utf-8") as stream:
        collectives = json.load(stream)
    moved = max(float(np.max(np.abs(single[name] - initial[name]))) for name in single.files)
    difference = max(float(np.max(np.abs(single[name] - ranks[name]))) for name in single.files)
    summary = (
        f"{ACCUMULATION_STEPS} steps, 2 processes x 2 micro-batches vs 1 x 4: weights differ by {difference:.2e}, "
        f"the updates moved them {moved:.2e} (tolerance {ACCUMULATION_TOLERANCE} of that)"
    )
    wrong = [
        f"step {step}: {', '.join(f'{counts[kind]} {kind}' for kind in EXPECTED_COLLECTIVES)}"
        for step, counts in enumerate(collectives, 1)
        if counts != EXPECTED_COLLECTIVES
    ]
    if wrong:
        expected = " and ".join(f"{count} {kind}" for kind, count in EXPECTED_COLLECTIVES.items())
        return failed(
            f"{summary}; expected {expected} per step (the gradients once, after the last micro-batch: "
            f"no_sync on the others; the finite/stop flag once), got {'; '.join(wrong)}"
        )
    if not difference <= ACCUMULATION_TOLERANCE * moved:
        return failed(summary)
    return passed(f"{summary}; each step all-reduced the gradients once and the finite/stop flag once")


def check_accumulation(gpu=True):
    with tempfile.TemporaryDirectory() as folder:
        runs = {}
        for processes in (1, 2):
            runs[processes] = os.path.join(folder, f"{processes}_processes")
            os.makedirs(runs[processes])
            result = subprocess.run(
                accumulation_command(runs[processes], processes, gpu), capture_output=True, text=True, timeout=600
            )
            if result.returncode != 0:
                logs = pathlib.Path(runs[processes], "logs")
                output = result.stderr + "".join(path.read_text() for path in sorted(logs.glob("workerlog.*")))
                return failed(f"the {processes}-process run failed (exit code {result.returncode}): {output[-1500:]}")
        return compare_accumulation(runs[1], runs[2])


# --- speed --------------------------------------------------------------------------------------------

# docs/performance.md expects about 40% of a GPU's dense peak (model FLOPs: 6 forward passes per
# distinct image with R-Drop, 3 without). Half of that is the floor: below it something is wrong (no
# flash kernel, float32 math, a host-bound input) and the row FAILs.
SPEED_FLOOR_UTILISATION = 0.2
SPEED_STEPS, SPEED_WARMUP = 5, 2


def speed_floor(cfg, peak_tflops):
    """Distinct training images/s per device at SPEED_FLOOR_UTILISATION of `peak_tflops`."""
    passes = 6 if cfg["rdrop"]["alpha"] else 3
    return SPEED_FLOOR_UTILISATION * peak_tflops * 1e12 / (passes * models.forward_flops(cfg["model"]))


def check_speed(cfg, world_size, peak_tflops, steps=SPEED_STEPS, warmup=SPEED_WARMUP):
    """The config's training step as each of `world_size` devices of a launch runs it: its share of
    train.global_batch_size, in the micro-batches that world size gives, drawn from the training
    stream train.py reads (data.TrainStream: the loader, and the crop on the device with
    data.device_augment). One process, so the gradient all-reduce is not timed. Images/s per device
    below speed_floor FAILs; without a known peak for the device there is no floor (SKIPPED)."""
    accumulation = accumulation_steps(cfg["train"], world_size)  # the config's own error if it does not divide
    share = random_weights_config(cfg, global_batch_size=cfg["train"]["global_batch_size"] // world_size)
    trainer = build(share, distributed.Context(0, 1))
    data.prepare_dataset(cfg)
    stream = data.TrainStream(cfg, 0, world_size)
    trainer.ddp_model.train()
    try:
        seconds = benchmarking.time_calls(
            lambda: trainer.train_step(itertools.islice(stream, accumulation)), steps, warmup
        )
    finally:
        stream.close()
    images_per_second = share["train"]["global_batch_size"] / statistics.median(seconds)
    input_path = (
        "the training loader and the crop on the device" if cfg["data"]["device_augment"] else "the training loader"
    )
    summary = (
        f"{images_per_second:.0f} img/s per device, amp {cfg['train']['amp']}: {world_size} device(s) x "
        f"{accumulation} micro-batch(es) of {cfg['train']['micro_batch_size']} per step, through {input_path} "
        f"(median of {steps} steps)"
    )
    if paddle.device.is_compiled_with_cuda() and paddle.get_device().startswith("gpu"):
        summary += f", peak memory {paddle.device.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    if peak_tflops is None:
        return skipped(f"{summary}; no dense peak known for this device, so no floor: compare docs/performance.md")
    floor = speed_floor(cfg, peak_tflops)
    verdict = f"floor {floor:.0f} img/s ({SPEED_FLOOR_UTILISATION:.0%} of {peak_tflops:g} TFLOP/s)"
    return (passed if images_per_second >= floor else failed)(f"{summary}; {verdict}")


# --- the table -------------------------------------------------------------------------------------------


def guarded(check, *arguments):
    """The check's result, or a FAIL naming the exception it raised."""
    try:
        return check(*arguments)
    except Exception as error:  # one broken check must not hide the others' results
        where = traceback.extract_tb(error.__traceback__)[-1]
        return failed(f"raised {type(error).__name__}: {error} ({os.path.basename(where.filename)}:{where.lineno})")


def run_checks(cfg):
    results = {"build": check_build()}
    gpus = paddle.device.cuda.device_count() if results["build"].status == "PASS" else 0
    no_gpu = "needs a GPU" + ("" if results["build"].status == "PASS" else " (see build)")
    if gpus:
        paddle.set_device("gpu:0")
        results["attention"] = guarded(check_attention, cfg)
        results["bf16 step"] = guarded(check_bf16_step, cfg)
        results["fp16 resume"] = guarded(check_fp16_resume, cfg)
    else:
        results["attention"] = skipped(
            f"{no_gpu}: autocast and flash attention do nothing on a CPU; tests/test_models.py checks that "
            f"the final norm and head leave autocast"
        )
        results["bf16 step"] = skipped(f"{no_gpu}: bf16 autocast does nothing on a CPU")
        results["fp16 resume"] = skipped(
            f"{no_gpu}: Paddle disables the loss scaler on a CPU; tests/test_checkpoint.py resumes a GPU-shaped "
            f"scaler state"
        )
    if gpus >= 2:
        results["accumulation"] = guarded(check_accumulation)
    else:
        results["accumulation"] = skipped(
            f"needs 2 GPUs ({gpus} here); tests/test_train.py checks it on 2 CPU processes (gloo), and "
            f"tests/test_gpu_check.py plants a missing no_sync and an extra all-reduce there"
        )
    if gpus:
        peak = benchmark.default_peak_tflops(paddle.device.cuda.get_device_name(), cfg["train"]["amp"])
        results["speed"] = guarded(check_speed, cfg, gpus, peak)
    else:
        results["speed"] = skipped(
            f"{no_gpu}: measures the GPU step; tests/test_gpu_check.py runs it on a CPU with a planted slow step"
        )
    return results


def exit_code(results):
    """1 if a check failed, NOTHING_CHECKED if every row was SKIPPED, else 0."""
    statuses = {result.status for result in results.values()}
    if "FAIL" in statuses:
        return 1
    return NOTHING_CHECKED if statuses == {"SKIPPED"} else 0


def print_table(results):
    width = max(map(len, results))
    for name, (status, detail) in results.items():
        print(f"{name:{width}s}  {status:7s}  {detail}")
    failures = sum(result.status == "FAIL" for result in results.values())
    if failures:
        print(f"{failures} check(s) failed")
    elif exit_code(results) == NOTHING_CHECKED:
        print(f"nothing was checked: all {len(results)} rows were skipped (exit code {NOTHING_CHECKED}, not a pass)")
    else:
        skipped_rows = sum(result.status == "SKIPPED" for result in results.values())
        print("no check failed" + (f" ({skipped_rows} skipped)" if skipped_rows else ""))


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    if args.accumulation_worker:
        accumulation_worker(args.accumulation_worker)
        return 0
    cfg = config.load(args.config, args.override)
    results = run_checks(cfg)
    print_table(results)
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
