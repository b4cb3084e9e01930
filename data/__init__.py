"""Input pipeline, in the order the images flow: datasets (read, split) -> sampling (which images each
rank reads, and when) -> transforms (crop, resize, normalise, on the host or the device) -> loader
(the iterators the trainer and evaluator use). Everything random is seeded from `train.seed` through
rdrop/seeding.py, so the batches and crops depend only on the seed and the position in the run.

    stream = data.TrainStream(cfg, rank, world_size)          # endless training micro-batches
    images, labels = next(stream); logits = model(images)
    stream.state_dict() / stream.set_state_dict(state)        # resume where a run stopped
    stream.close()                                            # stop its workers (also on garbage collection)

    loader = data.build_eval_loader(cfg, "test", rank, world_size)   # or "val"; shards without padding
    for images, labels in loader: ...

    data.prepare_dataset(cfg)   # locate/download the archive, or check the image files (one rank per machine, first)
    data.class_names(cfg)       # names for reports

Either way `images` is float32 N x 3 x img_size x img_size, normalised, and `labels` int64 N.
"""

from data.loader import InputSettings, TrainStream, build_eval_loader, class_names, prepare_dataset
from data.sampling import StepSizes

__all__ = [
    "InputSettings",
    "StepSizes",
    "TrainStream",
    "build_eval_loader",
    "class_names",
    "prepare_dataset",
]
