"""The three splits the project uses ("train", "val", "test") for the configured dataset.

"val" is `data.val_size` images carved out of the official training set, as class-balanced as the
class counts allow and fixed by `train.seed`; "train" is the official training set without them.
Labels are checked against `model.num_classes` here, once, for every dataset.
"""

import logging

from rdrop.errors import UserError

import numpy as np

from data import cifar100, digits
from data.seeding import Purpose, derived_rng

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def dataset_file(settings):
    """The CIFAR-100 archive to read (downloading it if allowed), or None for digits."""
    if settings.dataset == "cifar100":
        return cifar100.resolve_archive(settings.data_file, settings.download)
    return None


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
    rng = derived_rng(seed, Purpose.VALIDATION_SPLIT)
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
    if settings.dataset == "cifar100":
        image_set = cifar100.load_cifar100(dataset_file(settings), split, settings.num_classes)
    else:
        image_set = digits.load_digits_split(split)
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
