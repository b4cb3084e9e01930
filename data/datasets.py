"""The datasets, reduced to two forms, and the three splits the project uses.

CIFAR and the digits are held in memory as an `ImageSet`; image files (`folder`, `filelist`) as an
`image_files.FileSet` of paths, decoded in the loader workers as they are read. Both have labels,
class names, a source and `subset`, which is all the splits need.

`DATASETS` maps each `data.dataset` name to how it is located (found or downloaded, on one rank
before the others read) and how its official "train" and "test" splits are loaded; a new dataset is
one more entry. "val" is `data.val_size` images carved out of the official training set, as
class-balanced as the class counts allow and fixed by `train.seed`; "train" is the official
training set without them. Labels are checked against `model.num_classes` here, once, for every
dataset.
"""

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from rdrop import seeding
from rdrop.errors import UserError

import numpy as np

from data import cifar, image_files

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # uint8, N x 3 x H x W (channel-major, like the CIFAR rows)
    labels: np.ndarray  # int64, N
    class_names: tuple
    source: str  # where the images came from (a file path or a package), for messages

    def __len__(self):
        return len(self.labels)

    def subset(self, indices):
        return ImageSet(self.images[indices], self.labels[indices], self.class_names, self.source)


# --- CIFAR-10 and CIFAR-100 ------------------------------------------------------------------------


def locate_cifar(settings):
    return cifar.resolve_archive(cifar.ARCHIVES[settings.dataset], settings.data_file, settings.download)


def load_cifar(settings, split):
    path = Path(locate_cifar(settings)).resolve()
    stat = path.stat()
    return _cifar_split(
        cifar.ARCHIVES[settings.dataset], path, stat.st_mtime_ns, stat.st_size, split, settings.num_classes
    )


@functools.lru_cache(maxsize=4)
def _cifar_split(archive, path, mtime_ns, size, split, num_classes):
    """mtime_ns and size are part of the cache key so a replaced file is read again; num_classes only
    sizes the fallback class names used when the archive has no meta member."""
    images, labels = cifar.read_split(archive, path, split)
    # The cached arrays are shared by every caller (train, val, test views): make them read-only.
    images.flags.writeable = False
    labels.flags.writeable = False
    return ImageSet(images, labels, cifar.read_class_names(archive, path, num_classes), str(path))


# --- digits ---------------------------------------------------------------------------------------
# The offline quickstart dataset: UCI hand-written digits as shipped inside scikit-learn, 1,797
# greyscale 8x8 images with values 0..16 in 10 classes. They become CIFAR-like uint8 RGB 32x32
# images (values scaled to 0..255, grey replicated into three channels, each pixel repeated into a
# 4x4 block). Fixed split, no randomness: for every class, its last DIGITS_TEST_PER_CLASS images in
# scikit-learn's order form the test set (300 images) and the rest the training set (1,497).

DIGITS_TEST_PER_CLASS = 30
DIGITS_CLASSES = 10
DIGITS_MAX_VALUE = 16
DIGITS_UPSAMPLE = 4  # 8x8 -> 32x32, the CIFAR image size
DIGITS_SOURCE = "sklearn.datasets.load_digits"


def load_digits(settings, split):
    images, labels = _all_digits()
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in range(DIGITS_CLASSES):
        is_test[np.flatnonzero(labels == digit)[-DIGITS_TEST_PER_CLASS:]] = True
    keep = is_test if split == "test" else ~is_test
    return ImageSet(images[keep], labels[keep], tuple(str(digit) for digit in range(DIGITS_CLASSES)), DIGITS_SOURCE)


@functools.lru_cache(maxsize=1)
def _all_digits():
    import sklearn.datasets  # slow to import and only needed here

    bunch = sklearn.datasets.load_digits()
    grey = np.rint(bunch.images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
    upsampled = grey.repeat(DIGITS_UPSAMPLE, axis=1).repeat(DIGITS_UPSAMPLE, axis=2)
    images = np.repeat(upsampled[:, None], 3, axis=1)
    labels = bunch.target.astype(np.int64)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


# --- image files: `folder` and `filelist` (data/image_files.py) -----------------------------------
# Indexed once per process (the index is a pure function of the folders or lists); every file is
# checked by `locate`, which runs on one rank per machine before the others build their loaders.


def locate_files(settings):
    sets = _file_sets(settings)
    started = time.perf_counter()
    processes = len(os.sched_getaffinity(0))
    for file_set in sets.values():
        image_files.check_files(file_set, processes)
    logger.info(
        "checked the %d training and %d test files in %.1f s (%d processes)",
        len(sets["train"]),
        len(sets["test"]),
        time.perf_counter() - started,
        processes,
    )
    return sets["train"].source


def load_files(settings, split):
    return _file_sets(settings)[split]


def _file_sets(settings):
    if settings.dataset == "folder":
        keys = {"data.train_dir": settings.train_dir, "data.test_dir": settings.test_dir}
    else:
        keys = {
            "data.root": settings.root,
            "data.train_list": settings.train_list,
            "data.test_list": settings.test_list,
        }
    missing = [key for key, value in keys.items() if value is None]
    if missing:
        raise UserError(
            f"data.dataset: {settings.dataset} reads its images from {' and '.join(keys)}, but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Set "
            f"{'them' if len(missing) > 1 else 'it'} in the config or with -o {missing[0]}=PATH."
        )
    if settings.dataset == "folder":
        return _indexed(image_files.index_folders, *keys.values(), settings.num_classes)
    return _indexed(image_files.read_file_lists, *keys.values(), settings.class_names_file, settings.num_classes)


@functools.lru_cache(maxsize=2)
def _indexed(index, *arguments):
    return index(*arguments)


# --- the registry and the splits ------------------------------------------------------------------


class Dataset(NamedTuple):
    locate: Callable  # settings -> the file it reads (found, or downloaded if allowed), or None
    load: Callable  # (settings, "train" | "test") -> ImageSet of that official split


DATASETS = {
    "cifar100": Dataset(locate_cifar, load_cifar),
    "cifar10": Dataset(locate_cifar, load_cifar),
    "folder": Dataset(locate_files, load_files),
    "filelist": Dataset(locate_files, load_files),
    "digits": Dataset(lambda settings: None, load_digits),
}


def locate(settings):
    return DATASETS[settings.dataset].locate(settings)


def load_split(settings, split):
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    official = _load_official(settings, "test" if split == "test" else "train")
    if split == "test":
        return official
    if split == "val" and settings.val_size == 0:
        raise UserError(
            "The 'val' split was requested but data.val_size is 0; set data.val_size to the "
            "number of training images to hold out for validation (e.g. 5000 for CIFAR-100)."
        )
    if settings.val_size == 0:
        return official
    val_indices = validation_indices(official.labels, settings.val_size, settings.seed, official.source)
    if split == "val":
        return official.subset(val_indices)
    return official.subset(np.setdiff1d(np.arange(len(official)), val_indices))


def validation_indices(labels, val_size, seed, source):
    """Sorted indices of `val_size` images, spread over the classes round-robin.

    Each class's images are shuffled and the classes visited in a shuffled order; taking images in
    order of (position within class, class order) gives every class floor or ceil of
    val_size / num_classes images while it has that many, and spreads the rest over the others.
    """
    if val_size >= len(labels):
        raise UserError(
            f"data.val_size is {val_size} but the training set of {source} has only {len(labels)} "
            "images; the validation split must leave images to train on. Use a smaller "
            "data.val_size (0 disables the split)."
        )
    rng = seeding.generator(seed, seeding.Purpose.VALIDATION_SPLIT)
    order = rng.permutation(len(labels))
    shuffled_labels = labels[order]
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(shuffled_labels == label)
        rank_in_class[members] = np.arange(len(members))
    class_order = rng.permutation(int(labels.max()) + 1)[shuffled_labels]
    chosen = order[np.lexsort((class_order, rank_in_class))[:val_size]]
    return np.sort(chosen)


def _load_official(settings, split):
    image_set = DATASETS[settings.dataset].load(settings, split)
    _check_labels(image_set, split, settings.num_classes)
    return image_set


def _check_labels(image_set, split, num_classes):
    bad = np.flatnonzero((image_set.labels < 0) | (image_set.labels >= num_classes))
    if len(bad):
        first = int(bad[0])
        raise UserError(
            f"{image_set.source}: the {split} split has {len(bad)} label(s) outside "
            f"[0, {num_classes}) (model.num_classes), e.g. label {int(image_set.labels[first])} at "
            f"index {first}. Set model.num_classes to the dataset's number of classes "
            f"({len(image_set.class_names)} named in the dataset) or fix the file."
        )
    if len(image_set.class_names) != num_classes:
        logger.warning(
            "%s names %d classes but model.num_classes is %d",
            image_set.source,
            len(image_set.class_names),
            num_classes,
        )
