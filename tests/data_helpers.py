"""Shared helpers for the data-package tests: config dicts and mapping images back to indices."""

import numpy as np

from data.loader import FILE_DATASET_KEYS


def make_cfg(
    data_file,
    *,
    dataset="cifar100",
    img_size=32,
    num_classes=10,
    seed=0,
    micro_batch_size=4,
    global_batch_size=None,
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
        **dict.fromkeys(FILE_DATASET_KEYS),
    }
    data_section.update(data)
    return {
        "data": data_section,
        "model": {"img_size": img_size, "num_classes": num_classes},
        "train": {
            "seed": seed,
            "micro_batch_size": micro_batch_size,
            "global_batch_size": micro_batch_size if global_batch_size is None else global_batch_size,
        },
        "eval": {"batch_size": eval_batch_size},
    }


def index_lookup(images):
    """{image bytes: index} for uint8 images that are all distinct (random test images are)."""
    lookup = {image.tobytes(): index for index, image in enumerate(images)}
    assert len(lookup) == len(images)
    return lookup


# With these settings an image reaches the model unchanged but for normalisation, so `indices_of`
# can tell which images a batch holds: img_size 32 (the source size) and whole-image crops only.
IDENTIFIABLE = {"img_size": 32, "crop_scale": [1.0, 1.0]}


def indices_of(images, lookup):
    """Indices in `lookup` of a batch of model-ready images (a paddle tensor or array) loaded with
    IDENTIFIABLE settings: the normalisation is undone and the uint8 pixels looked up."""
    pixels = np.rint((np.asarray(images) + 1.0) * 127.5).astype(np.uint8)
    return [lookup[image.tobytes()] for image in pixels]
