"""The loaders the trainer and evaluator iterate: a resumable training stream and sharded eval
loaders. Both hand out (images, labels) ready for the model: float32 N x 3 x S x S normalised
images and int64 labels, whichever input path `data.device_augment` chooses.

Both wrap `paddle.io.DataLoader` (num_workers = data.num_workers, 0 reads in a background thread of
the calling process), whose workers run the per-image host work of `data.host_samples`. On the device
path they only gather uint8 images and crop boxes, and the loader finishes each batch on the device
with `data.device_transform` as it hands it out. The training stream is one endless DataLoader
iteration over `TrainBatchSampler`, so workers are started once, not every epoch; its position counts
the micro-batches handed to the caller, not what the loader has read ahead.
"""

import logging
import math
import shutil

from rdrop.errors import UserError

import paddle

from data.device_transform import resize_batch, resized_crop_batch
from data.host_samples import EvalSamples, TrainSamples
from data.settings import InputSettings
from data.sharding import StreamPosition, TrainBatchSampler, eval_shard
from data.splits import load_split

logger = logging.getLogger(__name__)

SHARED_MEMORY_DIR = "/dev/shm"
# Paddle keeps about prefetch_factor (2) batches per worker in flight; ask for twice that.
SHARED_MEMORY_BATCHES_PER_WORKER = 4
SOURCE_IMAGE_BYTES = 3 * 32 * 32
FEEDER_EXIT_SECONDS = 0.5


class TrainStream:
    """Endless iterator of this rank's (images, labels) training micro-batches, ready for the model."""

    def __init__(self, cfg, rank, world_size):
        self._batches = None  # the live DataLoader iterator, started by the first next()
        self._settings = InputSettings.from_config(cfg)
        self._samples = TrainSamples(load_split(self._settings, "train"), self._settings)
        self._rank = rank
        self._world_size = world_size
        if self.num_images < self.images_per_step:
            raise UserError(
                f"The training split of {self._samples.image_set.source} has {self.num_images} "
                f"images, fewer than one global micro-step of {self.images_per_step} "
                f"(world size {world_size} x train.micro_batch_size "
                f"{self._settings.micro_batch_size}). Lower train.micro_batch_size or "
                "data.val_size."
            )
        global_batch_size = cfg["train"]["global_batch_size"]
        if global_batch_size > self.num_images:
            raise UserError(
                f"train.global_batch_size ({global_batch_size}) is larger than the training set "
                f"({self.num_images} images): one optimizer step would go over it more than once. Choose at "
                f"most {self.num_images} (the recipes use 512)."
            )
        self._position = StreamPosition()

    @property
    def num_images(self):
        return len(self._samples)

    @property
    def images_per_step(self):
        return self._world_size * self._settings.micro_batch_size

    @property
    def batches_per_epoch(self):
        return self.num_images // self.images_per_step

    def __iter__(self):
        return self

    def __next__(self):
        if self._batches is None:
            self._batches = iter(self._loader_from(self._position))
        *images, labels = next(self._batches)
        self._position = self._position.advanced(1, self.batches_per_epoch)
        if self._settings.device_augment:
            pixels, boxes = images
            return resized_crop_batch(pixels, boxes, self._settings.img_size), labels
        return images[0], labels

    def state_dict(self):
        """Where the next micro-batch comes from, plus what is needed to check a resume."""
        return {
            "epoch": self._position.epoch,
            "batches_in_epoch": self._position.batches_in_epoch,
            "images_per_step": self.images_per_step,
            "num_images": self.num_images,
        }

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
        sampler = TrainBatchSampler(
            self.num_images,
            self._settings.seed,
            self._rank,
            self._world_size,
            self._settings.micro_batch_size,
            start=position,
        )
        return _data_loader(self._samples, self._settings, self._settings.micro_batch_size, batch_sampler=sampler)


class EvalLoader:
    """This rank's shard of an evaluation split as (images, labels) batches ready for the model."""

    def __init__(self, image_set, settings):
        self._settings = settings
        self._loader = _data_loader(EvalSamples(image_set, settings), settings, settings.eval_batch_size)

    def __len__(self):
        """Batches in this rank's shard (for progress reports)."""
        return len(self._loader)

    def __iter__(self):
        for images, labels in self._loader:
            if self._settings.device_augment:
                images = resize_batch(images, self._settings.img_size)
            yield images, labels


def build_eval_loader(cfg, split, rank, world_size):
    """An `EvalLoader` over this rank's shard of `split` ("val" or "test") in batches of
    eval.batch_size. Over all ranks every image is seen once; shards may differ by one image."""
    settings = InputSettings.from_config(cfg)
    if split not in ("val", "test"):
        raise ValueError(f"evaluation split must be 'val' or 'test', not {split!r}")
    image_set = load_split(settings, split)
    shard = eval_shard(len(image_set), rank, world_size)
    return EvalLoader(image_set.subset(slice(shard.start, shard.stop)), settings)


def class_names(cfg):
    return load_split(InputSettings.from_config(cfg), "test").class_names


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
