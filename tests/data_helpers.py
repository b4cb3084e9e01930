"""Shared helpers for the data-package tests: config dicts and mapping images back to indices."""

import numpy as np


def make_cfg(
    data_file,
    *,
    dataset="cifar100",
    img_size=32,
    num_classes=10,
    seed=0,
    micro_batch_size=4,
    eval_batch_size=8,
    **data,
):
    data_section = {
        "dataset": dataset,
        "data_file": None if data_file is None else str(data_file),
        "download": False,
        "crop_scale": [0.05, 1.0],
        "num_workers": 0,
        "val_size": 0,
        "device_augment": False,
    }
    data_section.update(data)
    return {
        "data": data_section,
        "model": {"img_size": img_size, "num_classes": num_classes},
        "train": {"seed": seed, "micro_batch_size": micro_batch_size},
        "eval": {"batch_size": eval_batch_size},
    }


def index_lookup(images):
    """{image bytes: index} for uint8 images that are all distinct (random test images are)."""
    lookup = {image.tobytes(): index for index, image in enumerate(images)}
    assert len(lookup) == len(images)
    return lookup


def indices_of(pixels, lookup):
    """Indices of a uint8 N x 3 x H x W batch (a paddle tensor or array) in `lookup`."""
    return [lookup[image.tobytes()] for image in np.asarray(pixels)]
