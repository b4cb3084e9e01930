"""Which images each rank reads: the step's sizes, an endless sharded reshuffled training order, and
eval shards.

A step of `train.global_batch_size` images is `accumulation` micro-steps; a micro-step is one
micro-batch of `train.micro_batch_size` on each of world_size processes (`StepSizes`).

Training: epoch e visits the training set in the permutation drawn from (train.seed, e), the same
on every rank and for every world size. Global micro-step s takes the next world_size *
micro_batch_size images of it and rank r the r-th slice of micro_batch_size, so the ranks read
disjoint shards, all run the same number of micro-batches, and step s covers the same images
whatever the world size. The tail that does not fill a whole global micro-step is dropped (it is a
different tail every epoch). A position is (epoch, micro-batches already taken in that epoch).

Evaluation: rank r gets a contiguous block of the split; blocks differ in size by at most one and
together cover every image exactly once, with no padding.
"""

from dataclasses import dataclass

from rdrop import seeding


@dataclass(frozen=True)
class StepSizes:
    """How one optimizer step's images divide over processes and micro-batches."""

    global_batch_size: int
    micro_batch_size: int
    world_size: int

    @property
    def images_per_micro_step(self):
        """One micro-batch on every process."""
        return self.micro_batch_size * self.world_size

    def micro_steps_per_epoch(self, num_images):
        return num_images // self.images_per_micro_step


def epoch_permutation(seed, epoch, num_images):
    return seeding.generator(seed, seeding.Purpose.EPOCH_ORDER, epoch).permutation(num_images)


@dataclass(frozen=True)
class StreamPosition:
    epoch: int = 0
    batches_in_epoch: int = 0

    def advanced(self, batches, batches_per_epoch):
        total = self.batches_in_epoch + batches
        return StreamPosition(self.epoch + total // batches_per_epoch, total % batches_per_epoch)


class TrainBatchSampler:
    """Endless batch sampler for one rank: yields lists of (epoch, index) keys from `start` on."""

    def __init__(self, num_images, seed, rank, sizes, start=StreamPosition()):
        if not 0 <= rank < sizes.world_size:
            raise ValueError(f"rank {rank} outside [0, {sizes.world_size})")
        self.num_images = num_images
        self.seed = seed
        self.rank = rank
        self.sizes = sizes
        self.start = start
        if sizes.micro_steps_per_epoch(num_images) == 0:
            raise ValueError(f"{num_images} images do not fill one micro-step of {sizes.images_per_micro_step}")

    def __iter__(self):
        micro_batch, per_micro_step = self.sizes.micro_batch_size, self.sizes.images_per_micro_step
        epoch, first_batch = self.start.epoch, self.start.batches_in_epoch
        while True:
            order = epoch_permutation(self.seed, epoch, self.num_images)
            for step in range(first_batch, self.sizes.micro_steps_per_epoch(self.num_images)):
                begin = step * per_micro_step + self.rank * micro_batch
                yield [(epoch, int(index)) for index in order[begin : begin + micro_batch]]
            epoch, first_batch = epoch + 1, 0


def eval_shard(num_images, rank, world_size):
    """The indices rank `rank` evaluates: a contiguous block, sizes differing by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return range(rank * num_images // world_size, (rank + 1) * num_images // world_size)
