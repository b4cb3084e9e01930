"""The offline quickstart dataset: UCI hand-written digits as shipped inside scikit-learn.

`sklearn.datasets.load_digits` holds 1,797 greyscale 8x8 images with values 0..16 in 10 classes.
They become CIFAR-like uint8 RGB 32x32 images (values scaled to 0..255, grey replicated into three
channels, each pixel repeated into a 4x4 block) so they go through the same transforms,
sampler and loaders as CIFAR-100.

Fixed split, no randomness: for every class, its last TEST_PER_CLASS images in scikit-learn's
order form the test set (300 images, 30 per class) and the rest the training set (1,497 images).
"""

import functools

import numpy as np

from data.image_set import ImageSet

TEST_PER_CLASS = 30
NUM_CLASSES = 10
SOURCE_MAX_VALUE = 16
UPSAMPLE_FACTOR = 4  # 8x8 -> 32x32, the CIFAR image size
SOURCE = "sklearn.datasets.load_digits"


def load_digits_split(split):
    """The "train" or "test" split as an ImageSet."""
    images, labels = _all_digits()
    is_test = _test_mask(labels)
    keep = is_test if split == "test" else ~is_test
    return ImageSet(images[keep], labels[keep], tuple(str(digit) for digit in range(NUM_CLASSES)), SOURCE)


@functools.lru_cache(maxsize=1)
def _all_digits():
    from sklearn.datasets import load_digits  # scikit-learn is slow to import and only needed here

    bunch = load_digits()
    grey = np.rint(bunch.images * (255.0 / SOURCE_MAX_VALUE)).astype(np.uint8)
    upsampled = grey.repeat(UPSAMPLE_FACTOR, axis=1).repeat(UPSAMPLE_FACTOR, axis=2)
    images = np.repeat(upsampled[:, None], 3, axis=1)
    labels = bunch.target.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _test_mask(labels):
    mask = np.zeros(len(labels), dtype=bool)
    for digit in range(NUM_CLASSES):
        mask[np.flatnonzero(labels == digit)[-TEST_PER_CLASS:]] = True
    return mask
