"""Measure the training step (with and without R-Drop) and evaluation on the current device.

    python scripts/benchmark.py --config configs/vit_b16_cifar100_rdrop.yaml [-o key=value ...]
        [--steps 10] [--warmup 3] [--json out.json] [--peak-tflops 989] [--recompute]

Random data of the config's shape goes through the real model, loss, optimizer and AMP settings:
the same `rdrop.step.TrainStep` that train.py runs, on one device. Each measurement runs in a fresh
process, so peak memory belongs to that measurement alone.

Reported per mode: img_per_s (distinct training images per second; R-Drop sees each image twice and
counts it once), step_time_s (seconds per optimizer step), peak memory (GPU: Paddle's max allocated;
CPU: peak resident set), forward GFLOPs per image (analytic), achieved TFLOP/s (a training pass is
3x the forward, R-Drop two passes per image) and utilisation of --peak-tflops.
"""
import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import rdrop  # noqa: E402,F401  (first: it quiets Paddle's import-time logging)
import paddle  # noqa: E402

import models  # noqa: E402
from rdrop import config, distributed, optim, precision, runtime  # noqa: E402
from rdrop.errors import exit_on_user_error  # noqa: E402
from rdrop.step import TrainStep  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s), matched against the device name.
KNOWN_PEAK_TFLOPS = {"H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
                     "A10": 125.0, "V100": 125.0, "4090": 165.0}
MODES = ("rdrop", "plain", "eval")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("-o", "--override", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--peak-tflops", type=float, help="device peak for the utilisation column")
    parser.add_argument("--recompute", action="store_true",
                        help="also measure the R-Drop step with train.recompute on (memory saved)")
    parser.add_argument("--only", choices=MODES + ("rdrop_recompute",), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def peak_memory_bytes():
    if paddle.device.is_compiled_with_cuda() and paddle.device.get_device().startswith("gpu"):
        return int(paddle.device.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def synchronize(tensor):
    float(tensor)


def measure(cfg, mode, steps, warmup):
    """One mode in this process: seconds per step (or per eval batch) and peak memory."""
    cfg["train"]["recompute"] = mode == "rdrop_recompute"
    if mode == "plain":
        cfg["rdrop"]["alpha"] = 0.0
    train_cfg, model_cfg = cfg["train"], cfg["model"]
    runtime.configure_cpu(train_cfg["cpu_threads"])
    context = distributed.Context(0, 1)
    paddle.seed(train_cfg["seed"])
    model = models.build_model(model_cfg)
    model.recompute = train_cfg["recompute"]
    size = model_cfg["img_size"]
    if mode == "eval":
        batch = cfg["eval"]["batch_size"]
        images = paddle.randn([batch, 3, size, size])
        model.eval()

        def run_once():
            with paddle.no_grad(), precision.autocast(train_cfg["amp"]):
                return model(images).sum()
        images_per_run = batch
    else:
        optimizer, scheduler = optim.build(cfg["optimizer"], cfg["schedule"], model)
        accumulation = train_cfg["global_batch_size"] // train_cfg["micro_batch_size"]
        train_step = TrainStep(cfg, model, model, optimizer, scheduler, precision.loss_scaler(train_cfg["amp"]),
                               context, accumulation)
        micro = train_cfg["micro_batch_size"]
        batches = [(paddle.randn([micro, 3, size, size]), paddle.randint(0, model_cfg["num_classes"], [micro]))
                   for _ in range(accumulation)]
        model.train()

        def run_once():
            return train_step(iter(batches))["grad_norm"]
        images_per_run = train_cfg["global_batch_size"]
    for _ in range(warmup):
        synchronize(run_once())
    start = time.perf_counter()
    for _ in range(steps):
        result = run_once()
    synchronize(result)
    seconds = (time.perf_counter() - start) / steps
    return {"mode": mode, "step_time_s": seconds, "img_per_s": images_per_run / seconds,
            "peak_memory_mb": peak_memory_bytes() / 2**20}


def derived(result, cfg, peak_tflops):
    forward = models.forward_flops(cfg["model"])
    passes = {"rdrop": 2 * 3, "rdrop_recompute": 2 * 3, "plain": 3, "eval": 1}[result["mode"]]
    achieved = result["img_per_s"] * forward * passes / 1e12
    result.update(forward_gflops_per_image=forward / 1e9, achieved_tflops=achieved,
                  utilisation=achieved / peak_tflops if peak_tflops else None)
    return result


def default_peak():
    if not paddle.device.is_compiled_with_cuda() or not paddle.device.get_device().startswith("gpu"):
        return None
    name = paddle.device.cuda.get_device_name()
    return next((peak for key, peak in KNOWN_PEAK_TFLOPS.items() if key in name), None)


@exit_on_user_error
def main(argv=None):
    args = parse_args(argv)
    cfg = config.load(args.config, args.override)
    if args.only:
        print(json.dumps(measure(cfg, args.only, args.steps, args.warmup)))
        return
    modes = MODES + (("rdrop_recompute",) if args.recompute else ())
    peak = args.peak_tflops or default_peak()
    results = []
    for mode in modes:
        command = [sys.executable, __file__, *sys.argv[1:], "--only", mode]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(derived(json.loads(output.strip().splitlines()[-1]), cfg, peak))
    print(f"{'mode':<16}{'img/s':>10}{'s/step':>10}{'peak MB':>10}{'TFLOP/s':>10}{'util':>8}")
    for r in results:
        utilisation = f"{100 * r['utilisation']:.1f}%" if r["utilisation"] is not None else "-"
        print(f"{r['mode']:<16}{r['img_per_s']:>10.1f}{r['step_time_s']:>10.3f}{r['peak_memory_mb']:>10.0f}"
              f"{r['achieved_tflops']:>10.3f}{utilisation:>8}")
    by_mode = {r["mode"]: r for r in results}
    ratio = by_mode["rdrop"]["step_time_s"] / by_mode["plain"]["step_time_s"]
    print(f"R-Drop step time / plain step time: {ratio:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump({"config": args.config, "overrides": args.override, "peak_tflops": peak,
                       "rdrop_over_plain_step_time": ratio, "results": results}, stream, indent=2)


if __name__ == "__main__":
    main()
