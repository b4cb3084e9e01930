"""The loaders the trainer and evaluator iterate: a resumable training stream and sharded eval
loaders. Both hand out (images, labels) ready for the model: float32 N x 3 x S x S normalised
images and int64 labels, whichever input path `data.device_augment` chooses.

Both wrap `paddle.io.DataLoader` (num_workers = data.num_workers, 0 reads in a background thread of
the calling process), whose workers run the per-image host work of `TrainSamples` and `EvalSamples`.
On the device path they only gather uint8 images and crop boxes, and the loader finishes each batch
on the device as it hands it out. The training stream is one endless DataLoader iteration over
`TrainBatchSampler`, so workers are started once, not every epoch; its position counts the
micro-batches handed to the caller, not what the loader has read ahead.

The config reaches this package only through the entry points below (`TrainStream`,
`build_eval_loader`, `class_names`, `prepare_dataset`), which turn it into `InputSettings` once.
"""

import logging
import math
import shutil
from dataclasses import dataclass

from rdrop import seeding
from rdrop.errors import UserError

import numpy as np
import paddle
from PIL import Image

from data.datasets import load_split, locate
from data.image_files import FileSet
from data.sampling import StepSizes, StreamPosition, TrainBatchSampler, eval_shard
from data.transforms import (
    file_eval_pixels,
    file_train_pixels,
    resize_batch,
    resized_crop,
    resized_crop_batch,
    sample_crop_box,
    whole_image_box,
)

logger = logging.getLogger(__name__)

SHARED_MEMORY_DIR = "/dev/shm"
# Paddle keeps about prefetch_factor (2) batches per worker in flight; ask for twice that.
SHARED_MEMORY_BATCHES_PER_WORKER = 4
SOURCE_IMAGE_BYTES = 3 * 32 * 32
FEEDER_EXIT_SECONDS = 0.5


FILE_DATASET_KEYS = ("train_dir", "test_dir", "root", "train_list", "test_list", "class_names_file")


@dataclass(frozen=True)
class InputSettings:
    """The config keys the input pipeline depends on, all in one place (already validated by
    rdrop/config.py)."""

    dataset: str
    data_file: str | None
    download: bool
    train_dir: str | None
    test_dir: str | None
    root: str | None
    train_list: str | None
    test_list: str | None
    class_names_file: str | None
    crop_scale: tuple
    num_workers: int
    val_size: int
    device_augment: bool
    img_size: int
    num_classes: int
    seed: int
    micro_batch_size: int
    global_batch_size: int
    eval_batch_size: int

    @classmethod
    def from_config(cls, cfg):
        data = cfg["data"]
        return cls(
            dataset=data["dataset"],
            data_file=data["data_file"],
            download=bool(data["download"]),
            **{
                key: data[key]
                for key in ("train_dir", "test_dir", "root", "train_list", "test_list", "class_names_file")
            },
            crop_scale=tuple(float(value) for value in data["crop_scale"]),
            num_workers=int(data["num_workers"]),
            val_size=int(data["val_size"]),
            device_augment=bool(data["device_augment"]),
            img_size=int(cfg["model"]["img_size"]),
            num_classes=int(cfg["model"]["num_classes"]),
            seed=int(cfg["train"]["seed"]),
            micro_batch_size=int(cfg["train"]["micro_batch_size"]),
            global_batch_size=int(cfg["train"]["global_batch_size"]),
            eval_batch_size=int(cfg["eval"]["batch_size"]),
        )


def prepare_dataset(cfg):
    """Locate the dataset file, downloading it if the config allows (None for digits); for image
    files, index them and check every file, raising a UserError that names the bad ones.

    Call it on one rank (e.g. local rank 0) and barrier before building loaders, so that several
    processes do not download into the same cache file at once, nor check the same files.
    """
    return locate(InputSettings.from_config(cfg))


def class_names(cfg):
    return load_split(InputSettings.from_config(cfg), "test").class_names


# --- what the loader workers do per image ---------------------------------------------------------
# Training keys are (epoch, index) pairs from `TrainBatchSampler`; the crop of a sample is drawn from
# a generator derived from (train.seed, epoch, index) alone, so augmentation does not depend on which
# worker process reads the sample or on what was read before (no worker seeding needed, and a resumed
# stream gets the same crops). Evaluation keys are plain indices.
#
#     host path,   train: (float32 3 x S x S normalised, int64 label)
#     host path,   eval:  (float32 3 x S x S normalised, int64 label)
#     device path, train: (uint8 3 x 32 x 32, float32 [top, left, height, width], int64 label)
#     device path, eval:  (uint8 3 x 32 x 32, int64 label)


class TrainSamples(paddle.io.Dataset):
    def __init__(self, image_set, settings):
        super().__init__()
        self.image_set = image_set
        self._seed = settings.seed
        self._scale = settings.crop_scale
        self._size = settings.img_size
        self._device_augment = settings.device_augment

    def __len__(self):
        return len(self.image_set)

    def __getitem__(self, key):
        epoch, index = key
        image = self.image_set.images[index]
        label = self.image_set.labels[index]
        rng = seeding.generator(self._seed, seeding.Purpose.AUGMENTATION, epoch, index)
        box = sample_crop_box(rng, image.shape[1], image.shape[2], self._scale)
        if self._device_augment:
            return image, np.asarray(box, dtype=np.float32), label
        return resized_crop(image, box, self._size), label


class EvalSamples(paddle.io.Dataset):
    def __init__(self, image_set, settings):
        super().__init__()
        self.image_set = image_set
        self._size = settings.img_size
        self._device_augment = settings.device_augment

    def __len__(self):
        return len(self.image_set)

    def __getitem__(self, index):
        image = self.image_set.images[index]
        label = self.image_set.labels[index]
        if self._device_augment:
            return image, label
        return resized_crop(image, whole_image_box(image.shape[1], image.shape[2]), self._size), label


# Image files are decoded here, one at a time, so a worker holds one image whatever the dataset's
# size. A file that passed the start-of-run check (data/image_files.py) but cannot be decoded now
# (damaged or replaced since, or corrupt inside its compressed data) never stops the run: training
# takes the next decodable image of the set in its place, with the crop generator of the original
# key, and evaluation leaves it out of the metrics. Either way the sample carries the index of the
# file that failed (NO_FAILURE otherwise), and the loaders log and count it. A training sample also
# says whether no replacement decoded either, which ends the run with a UserError in the main process.

NO_FAILURE = -1
# Replacements tried for one sample before the stream stops the run: past this many consecutive
# unreadable files the storage itself has failed.
MAX_REPLACEMENTS = 100
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class FileTrainSamples(paddle.io.Dataset):
    """(float32 3 x S x S normalised, int64 label, int64 failed index, int64 1 if no replacement decoded)
    per (epoch, index) key."""

    def __init__(self, file_set, settings):
        super().__init__()
        self.image_set = file_set
        self._seed = settings.seed
        self._scale = settings.crop_scale
        self._size = settings.img_size

    def __len__(self):
        return len(self.image_set)

    def __getitem__(self, key):
        epoch, index = key
        failed = NO_FAILURE
        for attempt in range(MAX_REPLACEMENTS + 1):
            replacement = (index + attempt) % len(self.image_set)
            rng = seeding.generator(self._seed, seeding.Purpose.AUGMENTATION, epoch, index)
            try:
                pixels = file_train_pixels(self.image_set.path(replacement), rng, self._size, self._scale)
            except DECODE_ERRORS:
                failed = index
                continue
            return pixels, self.image_set.labels[replacement], np.int64(failed), np.int64(0)
        return (
            np.zeros((3, self._size, self._size), np.float32),
            self.image_set.labels[index],
            np.int64(index),
            np.int64(1),
        )


class FileEvalSamples(paddle.io.Dataset):
    """(float32 3 x S x S normalised, int64 label, int64 failed index) per index; zeros if it failed."""

    def __init__(self, file_set, settings):
        super().__init__()
        self.image_set = file_set
        self._size = settings.img_size

    def __len__(self):
        return len(self.image_set)

    def __getitem__(self, index):
        try:
            pixels, failed = file_eval_pixels(self.image_set.path(index), self._size), NO_FAILURE
        except DECODE_ERRORS:
            pixels, failed = np.zeros((3, self._size, self._size), np.float32), index
        return pixels, self.image_set.labels[index], np.int64(failed)


def _samples(image_set, settings, train):
    if not isinstance(image_set, FileSet):
        return (TrainSamples if train else EvalSamples)(image_set, settings)
    if settings.device_augment:
        raise UserError(
            f"data.device_augment: true crops and resizes batches of same-sized images on the device, "
            f"but data.dataset: {settings.dataset} reads images of any size, which are decoded, cropped "
            "and resized one by one in the loader workers. Set data.device_augment: false (and raise "
            "data.num_workers to feed the devices)."
        )
    return (FileTrainSamples if train else FileEvalSamples)(image_set, settings)


# --- the loaders ------------------------------------------------------------------------------------


class TrainStream:
    """Endless iterator of this rank's (images, labels) training micro-batches, ready for the model."""

    def __init__(self, cfg, rank, world_size):
        self._batches = None  # the live DataLoader iterator, started by the first next()
        self._settings = InputSettings.from_config(cfg)
        self._samples = _samples(load_split(self._settings, "train"), self._settings, train=True)
        self.reads_files = isinstance(self._samples.image_set, FileSet)
        self._unreadable_images = 0  # this process's, since `take_unreadable_count` last read them
        self._rank = rank
        self._sizes = StepSizes(self._settings.global_batch_size, self._settings.micro_batch_size, world_size)
        source = self._samples.image_set.source
        if self.num_images < self.images_per_step:
            raise UserError(
                f"The training split of {source} has {self.num_images} "
                f"images, fewer than one global micro-step of {self.images_per_step} "
                f"(world size {world_size} x train.micro_batch_size "
                f"{self._settings.micro_batch_size}). Lower train.micro_batch_size or "
                "data.val_size."
            )
        if self._sizes.global_batch_size > self.num_images:
            raise UserError(
                f"train.global_batch_size ({self._sizes.global_batch_size}) is larger than the training set "
                f"({self.num_images} images): one optimizer step would go over it more than once. Choose at "
                f"most {self.num_images} (the recipes use 512)."
            )
        self._position = StreamPosition()
        image_set = self._samples.image_set
        logger.info(
            "training on %d images of %d classes from %s (%s)",
            self.num_images,
            len(image_set.class_names),
            source,
            _listed(image_set.class_names),
        )

    @property
    def num_images(self):
        return len(self._samples)

    @property
    def images_per_step(self):
        """Images of one global micro-step (one micro-batch on every rank)."""
        return self._sizes.images_per_micro_step

    @property
    def batches_per_epoch(self):
        return self._sizes.micro_steps_per_epoch(self.num_images)

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self._batches = iter(self._loader_from(self._position))
        batch = next(self._batches)
        self._position = self._position.advanced(1, self.batches_per_epoch)
        if self.reads_files:
            images, labels, failed, exhausted = batch
            self._count_unreadable(failed.numpy(), exhausted.numpy().astype(bool))
            return images, labels
        *images, labels = batch
        if self._settings.device_augment:
            pixels, boxes = images
            return resized_crop_batch(pixels, boxes, self._settings.img_size), labels
        return images[0], labels

    def state_dict(self):
        """Where the next micro-batch comes from, plus what is needed to check a resume."""
        state = {
            "epoch": self._position.epoch,
            "batches_in_epoch": self._position.batches_in_epoch,
            "images_per_step": self.images_per_step,
            "num_images": self.num_images,
        }
        if self.reads_files:
            state["files_digest"] = self._samples.image_set.digest()
        return state

    def set_state_dict(self, state):
        """Continue where the stream that produced `state` stopped.

        A state saved with another world size or micro-batch size is converted through the number
        of images already taken in the epoch (the epoch order does not depend on either); when that
        is not a whole number of the new steps it is rounded up to the next step.
        """
        epoch, batches, saved_step, saved_images = self._parse_state(state)
        if saved_images != self.num_images:
            raise UserError(
                f"The checkpoint's data position was recorded for a training set of {saved_images} "
                f"images, but the current config gives {self.num_images} "
                f"({self._samples.image_set.source}); data.dataset, data.data_file or "
                "data.val_size changed. Restore them, or start a new run instead of resuming."
            )
        if self.reads_files and state.get("files_digest", self._samples.image_set.digest()) != (
            self._samples.image_set.digest()
        ):
            raise UserError(
                f"The checkpoint was trained on other files or labels than {self._samples.image_set.source} "
                f"now lists ({self.num_images} images either way): files were renamed, added, removed or "
                "relabelled since, so resuming would not continue that run's order. Restore the files, or "
                "start a new run with model.pretrained pointing at the checkpoint."
            )
        images_taken = batches * saved_step
        if images_taken % self.images_per_step:
            logger.warning(
                "resuming with %d images per micro-step instead of %d: skipping to the next whole "
                "step, %d images of epoch %d are not seen",
                self.images_per_step,
                saved_step,
                -images_taken % self.images_per_step,
                epoch,
            )
        self.close()
        self._position = StreamPosition(epoch, 0).advanced(
            math.ceil(images_taken / self.images_per_step), self.batches_per_epoch
        )

    def close(self):
        """Stop the loader's workers; iterating again restarts them at the current position."""
        if self._batches is not None:
            _shut_down(self._batches)
            self._batches = None

    def __del__(self):
        self.close()

    def _count_unreadable(self, failed, exhausted):
        image_set = self._samples.image_set
        if exhausted.any():
            first = int(failed[exhausted][0])
            raise UserError(
                f"None of the {MAX_REPLACEMENTS + 1} training files from {image_set.describe(first)} on "
                "can be decoded any more, although they passed the check at the start of the run: the "
                "storage holding them has failed or changed. Fix it, then resume with -o train.resume=auto."
            )
        for index in failed[failed != NO_FAILURE]:
            self._unreadable_images += 1
            logger.warning(
                "%s cannot be decoded any more; trained on the next readable image in its place",
                image_set.describe(int(index)),
            )

    def check_same_files_everywhere(self, gather):
        """Refuse to train when ranks indexed different files (another copy of the data on another
        machine); `gather(value)` returns every rank's value (rdrop.distributed.gather)."""
        if not self.reads_files:
            return
        digests = gather(self._samples.image_set.digest())
        if len(set(digests)) > 1:
            differing = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
            raise UserError(
                f"The processes of this job found different training files under "
                f"{self._samples.image_set.source}: rank(s) {differing} differ from rank 0 in file names "
                "or labels. Every machine needs an identical copy of the dataset; sync the copies and "
                "start again."
            )

    def take_unreadable_count(self):
        """Training files of this process replaced since the last call (image files only)."""
        count, self._unreadable_images = self._unreadable_images, 0
        return count

    def _parse_state(self, state):
        try:
            values = (
                int(state["epoch"]),
                int(state["batches_in_epoch"]),
                int(state.get("images_per_step", self.images_per_step)),
                int(state.get("num_images", self.num_images)),
            )
            valid = min(values[:2]) >= 0 and min(values[2:]) > 0
        except (KeyError, TypeError, ValueError, AttributeError):
            valid = False
        if not valid:
            raise UserError(
                f"The checkpoint's data-stream state {state!r} is malformed: it needs non-negative "
                "integers 'epoch' and 'batches_in_epoch' (and positive 'images_per_step' and "
                "'num_images' if present). The checkpoint is damaged or from another program; "
                "resume from another checkpoint."
            )
        return values

    def _loader_from(self, position):
        sampler = TrainBatchSampler(self.num_images, self._settings.seed, self._rank, self._sizes, start=position)
        return _data_loader(self._samples, self._settings, self._settings.micro_batch_size, batch_sampler=sampler)


class EvalLoader:
    """This rank's shard of an evaluation split as (images, labels) batches ready for the model.

    Image files that cannot be decoded any more are left out of the batches, logged, and counted in
    `unreadable_images` (of the last pass over the shard)."""

    def __init__(self, image_set, settings):
        self._settings = settings
        self._image_set = image_set
        samples = _samples(image_set, settings, train=False)
        self._loader = _data_loader(samples, settings, settings.eval_batch_size)
        self.unreadable_images = 0

    def __len__(self):
        """Batches in this rank's shard (for progress reports)."""
        return len(self._loader)

    def __iter__(self):
        self.unreadable_images = 0
        for images, labels, *failed in self._loader:
            if failed:
                images, labels = self._without_unreadable(images, labels, failed[0].numpy())
                if not len(labels):
                    continue
            if self._settings.device_augment:
                images = resize_batch(images, self._settings.img_size)
            yield images, labels

    def _without_unreadable(self, images, labels, failed):
        unreadable = failed != NO_FAILURE
        for index in failed[unreadable]:
            self.unreadable_images += 1
            logger.warning(
                "%s cannot be decoded any more; left out of this evaluation (%d such images in it so far "
                "on this process)",
                self._image_set.describe(int(index)),
                self.unreadable_images,
            )
        if not unreadable.any():
            return images, labels
        keep = paddle.to_tensor(np.flatnonzero(~unreadable))
        return paddle.gather(images, keep), paddle.gather(labels, keep)


def build_eval_loader(cfg, split, rank, world_size):
    """An `EvalLoader` over this rank's shard of `split` ("val" or "test") in batches of
    eval.batch_size. Over all ranks every image is seen once; shards may differ by one image."""
    settings = InputSettings.from_config(cfg)
    if split not in ("val", "test"):
        raise ValueError(f"evaluation split must be 'val' or 'test', not {split!r}")
    image_set = load_split(settings, split)
    shard = eval_shard(len(image_set), rank, world_size)
    return EvalLoader(image_set.subset(slice(shard.start, shard.stop)), settings)


def _shut_down(batches):
    """Stop a DataLoader iterator's feeder thread and worker processes.

    Dropping the iterator is not enough: Paddle's feeder thread references it, so its __del__,
    which stops both, never runs. Waking the thread before Paddle's own shutdown lets it exit at
    once instead of after Paddle's one-second polling sleep.
    """
    batches._exit_thread_expectedly()
    if batches._thread is not None:
        batches._thread.join(FEEDER_EXIT_SECONDS)
    batches._try_shutdown_all()


def _data_loader(samples, settings, batch_size, batch_sampler=None):
    workers = settings.num_workers
    batching = {"batch_sampler": batch_sampler} if batch_sampler else {"batch_size": batch_size}
    return paddle.io.DataLoader(
        samples,
        num_workers=workers,
        use_shared_memory=workers > 0 and _shared_memory_fits(settings, batch_size),
        return_list=True,
        **batching,
    )


def _shared_memory_fits(settings, batch_size):
    """Whether /dev/shm can hold the batches in flight (containers often give it only 64 MB,
    and running out kills workers with a bus error); if not, Paddle sends batches through pipes."""
    image_bytes = SOURCE_IMAGE_BYTES if settings.device_augment else 3 * settings.img_size**2 * 4
    needed = SHARED_MEMORY_BATCHES_PER_WORKER * settings.num_workers * batch_size * image_bytes
    try:
        free = shutil.disk_usage(SHARED_MEMORY_DIR).free
    except OSError:
        free = 0
    if free < needed:
        logger.warning(
            "%s has %.0f MB free, less than the %.0f MB the loader workers may need: passing "
            "batches through pipes instead (slower; give the container more shared memory)",
            SHARED_MEMORY_DIR,
            free / 2**20,
            needed / 2**20,
        )
        return False
    return True


def _listed(names, limit=5):
    shown = ", ".join(names[:limit])
    return shown + (f", ... {names[-1]}" if len(names) > limit else "")
