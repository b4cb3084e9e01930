"""Measure the cost of the two input paths: host augmentation vs device-side augmentation.

Host path: the full per-image transform (random resized crop to img_size, normalise) and batch
collation, on one host thread, plus the float32 bytes each image ships to the device. Device path:
the per-image host work (gather the uint8 32x32 image and draw its crop box) and its bytes, then
the batched crop/resize/normalise on the current Paddle device per micro-batch. Paddle's own
RandomResizedCrop + ToTensor + Normalize is timed too, as the baseline the host path replaces.
Images are random CIFAR-sized uint8 arrays, so no dataset is needed.

    python scripts/benchmark_input.py                       # defaults of the config system
    python scripts/benchmark_input.py --config configs/x.yaml --batch-size 64 --json out.json

Every figure is the best of --repeats rounds: on a shared machine the minimum is the most
reproducible estimate of the cost itself. Prints a table and, last, one JSON object.
"""

import argparse
import dataclasses
import json

from rdrop import atomic, benchmarking, config, runtime
from rdrop.errors import exit_on_user_error

import numpy as np
import paddle
from paddle.io.dataloader.collate import default_collate_fn
from paddle.vision import transforms as paddle_transforms
from PIL import Image

from data.datasets import ImageSet
from data.loader import EvalSamples, InputSettings, TrainSamples
from data.transforms import resize_batch, resized_crop_batch

# An H100 trains ViT-B/16 under R-Drop (two forward passes) at about this many images per second.
GPU_IMAGES_PER_SECOND = 3000


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", help="YAML config (img_size, micro_batch_size, crop_scale)")
    parser.add_argument("--img-size", type=int, help="output size (default: model.img_size)")
    parser.add_argument("--batch-size", type=int, help="micro-batch size (default: train.micro_batch_size)")
    parser.add_argument("--images", type=int, default=256, help="images per round of a host measurement")
    parser.add_argument("--batches", type=int, default=3, help="device batches per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per measurement; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="CPU math threads (default: all cores)")
    parser.add_argument("--json", help="also write the JSON result to this file")
    return parser.parse_args()


def settings_from(args):
    cfg = config.load(args.config) if args.config else config.defaults()
    if args.img_size:
        cfg["model"]["img_size"] = args.img_size
    if args.batch_size:
        cfg["train"]["micro_batch_size"] = args.batch_size
    return cfg, InputSettings.from_config(cfg)


def random_image_set(count):
    images = np.random.default_rng(0).integers(0, 256, size=(count, 3, 32, 32), dtype=np.uint8)
    labels = np.arange(count, dtype=np.int64) % 100
    return ImageSet(images, labels, tuple(str(i) for i in range(100)), "random images")


def best_seconds(function, repeats, warmup=0):
    """The fastest of `repeats` timed calls of function()."""
    return min(benchmarking.time_calls(function, repeats, warmup))


def seconds_per_image(samples, keys, batch_size, repeats):
    """Fetch and collate every key in micro-batches, as one loader worker does."""

    def fetch_all():
        for first in range(0, len(keys), batch_size):
            default_collate_fn([samples[key] for key in keys[first : first + batch_size]])

    return best_seconds(fetch_all, repeats) / len(keys)


def paddle_transform_seconds_per_image(settings, image_set, repeats):
    transform = paddle_transforms.Compose(
        [
            paddle_transforms.RandomResizedCrop(settings.img_size, scale=settings.crop_scale),
            paddle_transforms.ToTensor(),
            paddle_transforms.Normalize(mean=[0.5] * 3, std=[0.5] * 3),
        ]
    )
    pictures = [Image.fromarray(image.transpose(1, 2, 0)) for image in image_set.images]

    def transform_all():
        for picture in pictures:
            transform(picture)

    return best_seconds(transform_all, repeats) / len(pictures)


def device_seconds_per_batch(function, batches, repeats):
    def run_batches():
        for _ in range(batches):
            function()

    return best_seconds(run_batches, repeats, warmup=1) / batches  # the first calls compile and allocate


def measure(settings, images, batches, repeats, threads):
    image_set = random_image_set(images)
    train_keys = [(0, index) for index in range(images)]
    eval_keys = list(range(images))
    batch_size = settings.micro_batch_size
    host = dataclasses.replace(settings, device_augment=False)
    device = dataclasses.replace(settings, device_augment=True)

    device_train = TrainSamples(image_set, device)
    pixels, boxes, _ = default_collate_fn([device_train[key] for key in train_keys[:batch_size]])
    pixels, boxes = paddle.to_tensor(pixels), paddle.to_tensor(boxes)
    size = settings.img_size
    host_train = TrainSamples(image_set, host)
    host_eval = EvalSamples(image_set, host)
    return {
        "device": str(paddle.get_device()),
        "cpu_threads": threads,
        "img_size": size,
        "batch_size": batch_size,
        "repeats": repeats,
        "host_train_us_per_image": 1e6 * seconds_per_image(host_train, train_keys, batch_size, repeats),
        "host_eval_us_per_image": 1e6 * seconds_per_image(host_eval, eval_keys, batch_size, repeats),
        "paddle_transforms_us_per_image": 1e6 * paddle_transform_seconds_per_image(settings, image_set, repeats),
        "host_bytes_per_image": 3 * size * size * 4,
        "device_path_host_us_per_image": 1e6 * seconds_per_image(device_train, train_keys, batch_size, repeats),
        "device_path_bytes_per_image": 3 * 32 * 32 + 4 * 4,
        "device_train_ms_per_batch": 1e3
        * device_seconds_per_batch(lambda: resized_crop_batch(pixels, boxes, size), batches, repeats),
        "device_eval_ms_per_batch": 1e3
        * device_seconds_per_batch(lambda: resize_batch(pixels, size), batches, repeats),
    }


def print_table(result):
    per_image_rows = [
        ("host path: crop+resize+normalise+collate (train)", "host_train_us_per_image", "host_bytes_per_image"),
        ("host path: resize+normalise+collate (eval)", "host_eval_us_per_image", "host_bytes_per_image"),
        ("Paddle transforms: RandomResizedCrop+ToTensor+Normalize", "paddle_transforms_us_per_image", None),
        (
            "device path, host part: gather uint8 + crop box + collate",
            "device_path_host_us_per_image",
            "device_path_bytes_per_image",
        ),
    ]
    print(
        f"img_size {result['img_size']}, micro-batch {result['batch_size']}, device {result['device']}, "
        f"{result['cpu_threads']} CPU math thread(s)"
    )
    print(
        f"{'host work per image':60s} {'us/image':>10s} {'bytes/image':>12s} "
        f"{'cores at ' + str(GPU_IMAGES_PER_SECOND) + ' img/s':>18s}"
    )
    for label, cost_key, bytes_key in per_image_rows:
        cost = result[cost_key]
        shipped = f"{result[bytes_key]:,}" if bytes_key else "-"
        cores = cost * 1e-6 * GPU_IMAGES_PER_SECOND
        print(f"{label:60s} {cost:10.1f} {shipped:>12s} {cores:18.2f}")
    print(f"{'device work per micro-batch':60s} {'ms/batch':>10s} {'images/s':>12s}")
    for label, key in (
        ("device: crop+resize+normalise (train)", "device_train_ms_per_batch"),
        ("device: resize+normalise (eval)", "device_eval_ms_per_batch"),
    ):
        milliseconds = result[key]
        print(f"{label:60s} {milliseconds:10.2f} {result['batch_size'] / milliseconds * 1e3:12.0f}")


@exit_on_user_error
def main():
    args = parse_args()
    if args.json:
        atomic.check_writable(args.json, "--json")
    threads = runtime.configure_cpu(args.threads)
    _, settings = settings_from(args)
    result = measure(settings, args.images, args.batches, args.repeats, threads)
    print_table(result)
    print(json.dumps(result, sort_keys=True))
    if args.json:
        try:
            atomic.write_json(args.json, result, sort_keys=True)
        except OSError as error:
            raise atomic.write_error("the result to --json", args.json, error) from None


if __name__ == "__main__":
    main()
