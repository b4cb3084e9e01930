"""Measure the cost of the input paths: host vs device-side augmentation, or decoding image files.

Default mode, in-memory arrays (cifar100, cifar10, digits). Host path: the full per-image
transform (random resized crop to img_size, normalise) and batch collation, on one host thread,
plus the float32 bytes each image ships to the device. Device path: the per-image host work
(gather the uint8 32x32 image and draw its crop box) and its bytes, then the batched
crop/resize/normalise on the current Paddle device per micro-batch. Paddle's own
RandomResizedCrop + ToTensor + Normalize is timed too, as the baseline the host path replaces.
Images are random CIFAR-sized uint8 arrays, so no dataset is needed.

    python scripts/benchmark_input.py                       # defaults of the config system
    python scripts/benchmark_input.py --config configs/x.yaml --batch-size 64 --json out.json

`--jpeg` mode, image files (`folder`, `filelist`): generated JPEGs of ImageNet size (500x375,
quality 90) in a temporary class-per-folder tree. Per loader worker, in this one process: the
training sample exactly as a worker makes it (`data.loader.FileTrainSamples`: decode -> RGB ->
RandomResizedCrop(model.img_size, data.crop_scale) -> normalised float32) and collated in
micro-batches, against TARGET_PER_WORKER; bare Pillow decodes, with and without crop and resize
and at half scale (`Image.draft`), for reference. Then the real training DataLoader
(`data.loader.TrainStream`) with each of --workers worker processes. Both modes time the same
per-worker loop (`collate_all`).

    python scripts/benchmark_input.py --jpeg --config configs/vit_b16_imagenet_rdrop.yaml --workers 1 2

Every figure is the best of --repeats rounds: on a shared machine the minimum is the most
reproducible estimate of the cost itself. Per-worker figures are given in wall-clock time and in
the CPU time of this process (what a worker achieves with a core to itself; the wall-clock figure
also counts the time other processes took the core). Prints a table and, last, one JSON object.
"""

import argparse
import dataclasses
import json
import os
import tempfile
import time

from rdrop import atomic, benchmarking, config, runtime
from rdrop.errors import exit_on_user_error

import numpy as np
import paddle
from paddle.io.dataloader.collate import default_collate_fn
from paddle.vision import transforms as paddle_transforms
from PIL import Image

from data.datasets import ImageSet, load_split
from data.loader import EvalSamples, FileTrainSamples, InputSettings, TrainSamples, TrainStream
from data.transforms import resize_batch, resized_crop_batch, sample_crop_box

# An H100 trains ViT-B/16 under R-Drop (two forward passes) at about this many images per second.
GPU_IMAGES_PER_SECOND = 3000
# What one loader worker must decode and augment per second from JPEG files (issue 19's target).
TARGET_PER_WORKER = 150
# Issue 19's "ImageNet-sized" JPEG.
JPEG_SIZE = (500, 375)
JPEG_QUALITY = 90
JPEG_CLASSES = 4


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", help="YAML config (img_size, micro_batch_size, crop_scale)")
    parser.add_argument("--img-size", type=int, help="output size (default: model.img_size)")
    parser.add_argument("--batch-size", type=int, help="micro-batch size (default: train.micro_batch_size)")
    parser.add_argument("--images", type=int, default=256, help="images per round of a host measurement")
    parser.add_argument("--batches", type=int, default=3, help="device batches per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per measurement; the best is kept")
    parser.add_argument("--threads", type=int, default=None, help="CPU math threads (default: all cores)")
    parser.add_argument("--jpeg", action="store_true", help="measure the image-file path on generated JPEGs")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="--jpeg: DataLoader worker counts to measure"
    )
    parser.add_argument("--loader-batches", type=int, default=16, help="--jpeg: micro-batches per DataLoader run")
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


def collate_all(samples, keys, batch_size):
    """A call that fetches and collates every key in micro-batches, as one loader worker does."""

    def fetch_all():
        for first in range(0, len(keys), batch_size):
            default_collate_fn([samples[key] for key in keys[first : first + batch_size]])

    return fetch_all


def seconds_per_image(samples, keys, batch_size, repeats):
    return best_seconds(collate_all(samples, keys, batch_size), repeats) / len(keys)


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


# --- --jpeg: image files ------------------------------------------------------------------------------


def write_jpeg_folder(root, count, seed=0):
    """`count` training JPEGs in JPEG_CLASSES class folders under root/train and one test image per
    class under root/test; returns (train_dir, test_dir, mean file bytes of the training images)."""
    rng = np.random.default_rng(seed)
    width, height = JPEG_SIZE
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)
    sizes = []
    for split, images in (("train", count), ("test", JPEG_CLASSES)):
        for index in range(images):
            folder = os.path.join(root, split, f"class_{index % JPEG_CLASSES}")
            os.makedirs(folder, exist_ok=True)
            # Colour gradients under noise: a photo-like JPEG of tens of kilobytes, where pure noise or a
            # flat image would give the decoder far more or far less work than a photo does.
            slopes = rng.uniform(-0.5, 0.5, size=(3, 2)).astype(np.float32)
            gradient = np.stack([128 + slope[0] * columns + slope[1] * rows for slope in slopes], axis=-1)
            pixels = np.clip(gradient + rng.normal(0, 20, size=gradient.shape), 0, 255).astype(np.uint8)
            path = os.path.join(folder, f"{split}_{index:06d}.jpg")
            Image.fromarray(pixels).save(path, quality=JPEG_QUALITY)
            if split == "train":
                sizes.append(os.path.getsize(path))
    return os.path.join(root, "train"), os.path.join(root, "test"), float(np.mean(sizes))


def best_wall_and_cpu_seconds(function, repeats):
    """The fastest of `repeats` calls of function(), in wall-clock seconds and in this process's CPU seconds."""
    wall, cpu = [], []
    for _ in range(repeats):
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return min(wall), min(cpu)


def per_second(function, count, repeats):
    wall, cpu = best_wall_and_cpu_seconds(function, repeats)
    return {"wall_img_per_s": count / wall, "cpu_img_per_s": count / cpu}


def folder_config(cfg, train_dir, test_dir, workers):
    """The config with the generated folders as its dataset, read by `workers` loader workers."""
    data = {
        **cfg["data"],
        "dataset": "folder",
        "train_dir": train_dir,
        "test_dir": test_dir,
        "val_size": 0,
        "device_augment": False,
        "num_workers": workers,
    }
    train = {**cfg["train"], "global_batch_size": cfg["train"]["micro_batch_size"]}
    return {**cfg, "model": {**cfg["model"], "num_classes": JPEG_CLASSES}, "data": data, "train": train}


def per_worker_rates(settings, repeats):
    """img/s of one loader worker: the training samples as a worker makes and collates them, and bare
    Pillow references: decode, crop and resize with crop boxes of the same distribution; decode alone;
    decode at half the resolution (what `Image.draft` would give, for the docs' decision on it)."""
    samples = FileTrainSamples(load_split(settings, "train"), settings)
    keys = [(0, index) for index in range(len(samples))]
    paths = [samples.image_set.path(index) for index in range(len(samples))]

    def bare_decode_crop_resize():
        for index, path in enumerate(paths):
            image = Image.open(path).convert("RGB")
            box = sample_crop_box(np.random.default_rng(index), image.height, image.width, settings.crop_scale)
            crop = image.crop((box.left, box.top, box.left + box.width, box.top + box.height))
            crop.resize((settings.img_size, settings.img_size), Image.Resampling.BILINEAR)

    def bare_decode():
        for path in paths:
            Image.open(path).load()

    def bare_decode_at_half_scale():
        for path in paths:
            image = Image.open(path)
            image.draft("RGB", (image.width // 2, image.height // 2))
            image.load()

    return {
        "training_sample": per_second(collate_all(samples, keys, settings.micro_batch_size), len(keys), repeats),
        "bare_pillow_decode_crop_resize": per_second(bare_decode_crop_resize, len(paths), repeats),
        "bare_pillow_decode": per_second(bare_decode, len(paths), repeats),
        "bare_pillow_draft_half_scale": per_second(bare_decode_at_half_scale, len(paths), repeats),
    }


def loader_rate(cfg, batches):
    """img/s of the real training DataLoader over `batches` micro-batches, timed after its first
    batch (which starts the workers)."""
    stream = TrainStream(cfg, rank=0, world_size=1)
    try:
        next(stream)
        start = time.perf_counter()
        for _ in range(batches):
            next(stream)
        seconds = time.perf_counter() - start
    finally:
        stream.close()
    return batches * cfg["train"]["micro_batch_size"] / seconds


def measure_jpeg(cfg, settings, args, root):
    train_dir, test_dir, mean_bytes = write_jpeg_folder(root, args.images)
    files = folder_config(cfg, train_dir, test_dir, workers=0)
    result = {
        "mode": "jpeg",
        "jpeg_size": list(JPEG_SIZE),
        "jpeg_quality": JPEG_QUALITY,
        "jpeg_mean_bytes": mean_bytes,
        "images": args.images,
        "img_size": settings.img_size,
        "crop_scale": list(settings.crop_scale),
        "batch_size": settings.micro_batch_size,
        "repeats": args.repeats,
        "target_img_per_s_per_worker": TARGET_PER_WORKER,
        "load_average_1min_before": os.getloadavg()[0],
        "per_worker": per_worker_rates(InputSettings.from_config(files), args.repeats),
        "loader": {},
    }
    for workers in args.workers:
        rate = loader_rate(folder_config(cfg, train_dir, test_dir, workers), args.loader_batches)
        result["loader"][str(workers)] = {"img_per_s": rate, "img_per_s_per_worker": rate / max(workers, 1)}
    result["load_average_1min_after"] = os.getloadavg()[0]
    return result


def print_jpeg_table(result):
    width, height = result["jpeg_size"]
    print(
        f"{result['images']} JPEGs {width}x{height}, quality {result['jpeg_quality']}, "
        f"{result['jpeg_mean_bytes'] / 1e3:.0f} KB on average; img_size {result['img_size']}, crop_scale "
        f"{result['crop_scale']}, micro-batch {result['batch_size']}; 1-minute load average "
        f"{result['load_average_1min_before']:.1f} before, {result['load_average_1min_after']:.1f} after"
    )
    target = result["target_img_per_s_per_worker"]
    print(
        f"{'one loader worker (one process)':56s} {'img/s wall':>11s} {'img/s CPU':>10s} {'CPU vs ' + str(target):>11s}"
    )
    for label, key in (
        ("training sample as a worker makes it, collated", "training_sample"),
        ("bare Pillow: decode + crop + resize (reference)", "bare_pillow_decode_crop_resize"),
        ("bare Pillow: decode (reference)", "bare_pillow_decode"),
        ("bare Pillow: decode at 1/2 scale, Image.draft (reference)", "bare_pillow_draft_half_scale"),
    ):
        row = result["per_worker"][key]
        ratio = row["cpu_img_per_s"] / target
        print(f"{label:56s} {row['wall_img_per_s']:11.0f} {row['cpu_img_per_s']:10.0f} {ratio:10.2f}x")
    print(f"{'training DataLoader (data.loader.TrainStream)':56s} {'img/s':>11s} {'per worker':>10s}")
    for workers, row in result["loader"].items():
        print(f"{'  ' + workers + ' worker(s)':56s} {row['img_per_s']:11.0f} {row['img_per_s_per_worker']:10.0f}")


def write_result(result, path):
    print(json.dumps(result, sort_keys=True))
    if path:
        try:
            atomic.write_json(path, result, sort_keys=True)
        except OSError as error:
            raise atomic.write_error("the result to --json", path, error) from None


@exit_on_user_error
def main():
    args = parse_args()
    if args.json:
        atomic.check_writable(args.json, "--json")
    threads = runtime.configure_cpu(args.threads)
    cfg, settings = settings_from(args)
    if args.jpeg:
        with tempfile.TemporaryDirectory(prefix="benchmark_input_") as root:
            result = measure_jpeg(cfg, settings, args, root)
        print_jpeg_table(result)
    else:
        result = measure(settings, args.images, args.batches, args.repeats, threads)
        print_table(result)
    write_result(result, args.json)


if __name__ == "__main__":
    main()
