"""What the speed measurements share (scripts/benchmark.py, benchmark_input.py and gpu_check.py): timing a
call, and a random batch of the config's shape."""

import time

from rdrop import runtime

import paddle


def time_calls(function, repeats, warmup=0):
    """Seconds taken by each of `repeats` calls of `function()`, after `warmup` untimed calls. Each call
    is timed until the device has finished its work, not only until the work is queued."""
    for _ in range(warmup):
        function()
    runtime.wait_for_device()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        runtime.wait_for_device()
        seconds.append(time.perf_counter() - start)
    return seconds


def random_batch(cfg, batch_size):
    """(images, labels): standard-normal images and uniform labels of the config's model."""
    size = cfg["model"]["img_size"]
    images = paddle.randn([batch_size, 3, size, size], dtype="float32")
    labels = paddle.randint(0, cfg["model"]["num_classes"], [batch_size], dtype="int64")
    return images, labels
